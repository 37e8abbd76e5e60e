"""The quality benchmark's development set: 10 Tiny ImageNet classes at 32x32, as an image folder.

    python benchmarks/tiny_imagenet_subset.py --src=tiny-imagenet-200 --out=data/tin10

`--src` is an unpacked Tiny ImageNet (tiny-imagenet-200/, 64x64 JPEGs: train/<wnid>/images/*.JPEG and
val/images + val/val_annotations.txt). Writes OUT/train/<class>/*.png (500 per class) and
OUT/val/<class>/*.png (50 per class), each image box-filtered from 64x64 to 32x32. The README's
quality figures were measured on OUT/train; the script prints a digest of each split's pixels to check
that a folder is that set (the README gives OUT/train's). Copies of Tiny ImageNet already downsampled
to 32x32 are refused: their JPEG-compressed pixels are another set, on which the scores differ.

    python benchmarks/tiny_imagenet_subset.py --check=data/tin10   # digests of an existing folder

`--classes=WNID,...` writes other classes instead (folders named by words.txt's first name). The
README's held-out class set, on which no default was chosen, is `--classes=held_out`: 10 wnids drawn
at random (numpy default_rng(0)) from the 190 not in CLASSES.
"""

from __future__ import annotations

import argparse
import hashlib
import os

import numpy as np
from PIL import Image

SOURCE_SIZE, SIZE = (64, 64), (32, 32)

CLASSES = {  # distinct layouts and colours: animals, vehicles, food, a landscape
    "n01443537": "goldfish", "n04146614": "school_bus", "n02279972": "monarch", "n07749582": "lemon",
    "n09193705": "alp", "n02056570": "king_penguin", "n07873807": "pizza", "n04285008": "sports_car",
    "n02099601": "golden_retriever", "n01910747": "jellyfish",
}

HELD_OUT = ("n01698640", "n01774384", "n01945685", "n02190166", "n02480855", "n02699494", "n03201208",
            "n03796401", "n04399382", "n04417672")  # drawn by draw_held_out(wnids.txt); never used for tuning


def draw_held_out(all_wnids: list[str], k: int = 10, seed: int = 0) -> tuple[str, ...]:
    """k wnids drawn at random from those not in CLASSES (how HELD_OUT was drawn)."""
    rest = sorted(set(all_wnids) - set(CLASSES))
    return tuple(sorted(np.random.default_rng(seed).choice(rest, k, replace=False)))


def class_names(src: str, wnids: list[str]) -> dict[str, str]:
    """{wnid: folder name}: CLASSES' names, else words.txt's first name ('teddy, teddy bear' -> teddy)."""
    words = {}
    path = os.path.join(src, "words.txt")
    if os.path.exists(path):
        with open(path) as f:
            words = dict(line.rstrip("\n").split("\t", 1) for line in f if "\t" in line)
    return {w: CLASSES.get(w) or words.get(w, w).split(",")[0].strip().replace(" ", "_").replace("/", "_")
            for w in wnids}


def _convert(src: str, dst_dir: str) -> None:
    image = Image.open(src)
    if image.size != SOURCE_SIZE:
        raise SystemExit(f"{src}: {image.size[0]}x{image.size[1]}, expected Tiny ImageNet's 64x64 (a copy "
                         "already downsampled is another set: the README's scores do not apply to it)")
    os.makedirs(dst_dir, exist_ok=True)
    name = os.path.splitext(os.path.basename(src))[0] + ".png"
    image.convert("RGB").resize(SIZE, Image.BOX).save(os.path.join(dst_dir, name))


def pixel_digest(folder: str) -> str:
    """sha256 of every image's class, name and decoded RGB pixels, in sorted order: the same for the
    same images whatever PNG encoder wrote them."""
    h = hashlib.sha256()
    for cls in sorted(os.listdir(folder)):
        for f in sorted(os.listdir(os.path.join(folder, cls))):
            h.update(f"{cls}/{f}".encode())
            h.update(np.asarray(Image.open(os.path.join(folder, cls, f)).convert("RGB")).tobytes())
    return h.hexdigest()[:16]


def print_digests(out: str) -> None:
    for split in ("train", "val"):
        if os.path.isdir(os.path.join(out, split)):
            print(f"{split}: pixel digest {pixel_digest(os.path.join(out, split))}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", help="the unpacked tiny-imagenet-200 directory")
    p.add_argument("--out", help="where train/ and val/ are written")
    p.add_argument("--check", help="only print the digests of a folder written by this script")
    p.add_argument("--classes", default="", help="comma list of wnids, or 'held_out' (default: CLASSES)")
    args = p.parse_args(argv)
    if args.check:
        return print_digests(args.check)
    if not (args.src and args.out):
        raise SystemExit("give --src and --out (or --check=FOLDER)")
    if not os.path.isdir(os.path.join(args.src, "train")):
        raise SystemExit(f"{args.src}: no train/ folder (expected an unpacked tiny-imagenet-200)")
    wnids = (list(HELD_OUT) if args.classes == "held_out"
             else [w.strip() for w in args.classes.split(",") if w.strip()] or list(CLASSES))
    classes = class_names(args.src, wnids)
    for wnid in wnids:
        if not os.path.isdir(os.path.join(args.src, "train", wnid, "images")):
            raise SystemExit(f"{args.src}: no class {wnid} (train/{wnid}/images)")
    count = 0
    for wnid, name in classes.items():
        folder = os.path.join(args.src, "train", wnid, "images")
        for f in sorted(os.listdir(folder)):
            _convert(os.path.join(folder, f), os.path.join(args.out, "train", name))
            count += 1
    with open(os.path.join(args.src, "val", "val_annotations.txt")) as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 2 and fields[1] in classes:
                _convert(os.path.join(args.src, "val", "images", fields[0]),
                         os.path.join(args.out, "val", classes[fields[1]]))
                count += 1
    print(f"wrote {count} images under {args.out}")
    print_digests(args.out)


if __name__ == "__main__":
    main()
