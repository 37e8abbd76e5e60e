"""Sample-quality metrics, numpy / scipy only: npz files (`files`), Inception-feature metrics (FID,
sFID, IS, precision/recall: `features`) and SWD (`swd`). The `--mode=evaluate` job is `evaluate`."""
