"""The quality benchmark's development set: 10 Tiny ImageNet classes at 32x32, as an image folder.

    python benchmarks/tiny_imagenet_subset.py --src=tiny-imagenet-200 --out=data/tin10

`--src` is an unpacked Tiny ImageNet (tiny-imagenet-200/, 64x64 JPEGs: train/<wnid>/images/*.JPEG and
val/images + val/val_annotations.txt). Writes OUT/train/<class>/*.png (500 per class) and
OUT/val/<class>/*.png (50 per class), each image box-filtered from 64x64 to 32x32. The README's
quality figures were measured on OUT/train.
"""

from __future__ import annotations

import argparse
import os

from PIL import Image

CLASSES = {  # distinct layouts and colours: animals, vehicles, food, a landscape
    "n01443537": "goldfish", "n04146614": "school_bus", "n02279972": "monarch", "n07749582": "lemon",
    "n09193705": "alp", "n02056570": "king_penguin", "n07873807": "pizza", "n04285008": "sports_car",
    "n02099601": "golden_retriever", "n01910747": "jellyfish",
}


def _convert(src: str, dst_dir: str) -> None:
    os.makedirs(dst_dir, exist_ok=True)
    name = os.path.splitext(os.path.basename(src))[0] + ".png"
    Image.open(src).convert("RGB").resize((32, 32), Image.BOX).save(os.path.join(dst_dir, name))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", required=True, help="the unpacked tiny-imagenet-200 directory")
    p.add_argument("--out", required=True, help="where train/ and val/ are written")
    args = p.parse_args()
    if not os.path.isdir(os.path.join(args.src, "train")):
        raise SystemExit(f"{args.src}: no train/ folder (expected an unpacked tiny-imagenet-200)")
    count = 0
    for wnid, name in CLASSES.items():
        folder = os.path.join(args.src, "train", wnid, "images")
        for f in sorted(os.listdir(folder)):
            _convert(os.path.join(folder, f), os.path.join(args.out, "train", name))
            count += 1
    with open(os.path.join(args.src, "val", "val_annotations.txt")) as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 2 and fields[1] in CLASSES:
                _convert(os.path.join(args.src, "val", "images", fields[0]),
                         os.path.join(args.out, "val", CLASSES[fields[1]]))
                count += 1
    print(f"wrote {count} images under {args.out}")


if __name__ == "__main__":
    main()
