"""The components figure: layout, labels and the residual's display scaling (arrays only, no models)."""

import numpy as np
import pytest

from msf_jax.runtime import figures


def _components(n=3, size=16, f=2, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32)
    base = z.reshape(n, size // f, f, size // f, f, 3).mean(axis=(2, 4))
    up = base.repeat(f, axis=1).repeat(f, axis=2)
    u8 = lambda x: np.clip(np.round(127.5 * x + 127.5), 0, 255).astype(np.uint8)  # noqa: E731
    return u8(base), u8(up), (z - up) * 0.05, u8(z)


def test_residual_is_amplified_around_mid_grey():
    r = np.array([[[[-0.02, 0.0, 0.02]]]], np.float32)
    shown, gain = figures.residual_to_uint8(r)
    assert gain == pytest.approx(50.0)  # 1/0.02 would be 50: capped there
    np.testing.assert_array_equal(shown[0, 0, 0], [0, 128, 255])
    shown, gain = figures.residual_to_uint8(np.zeros((1, 2, 2, 3)))
    assert gain == 1.0 and (shown == 128).all()


def test_components_figure_layout():
    base, up, residual, final = _components()  # base 8x8, the others 16x16
    cell, pad, n = 48, 4, 3
    fig = figures.components_figure(base, up, residual, final, row_labels=["a", "bb", "ccc"], cell=cell)
    assert fig.dtype == np.uint8 and fig.ndim == 3 and fig.shape[2] == 3
    height, width = fig.shape[:2]

    def cell_at(row, col):  # cells are laid out from the bottom-right corner
        y = height - pad - (n - row) * (cell + pad)
        x = width - (4 - col) * (cell + pad)
        return fig[y:y + cell, x:x + cell]

    up6 = lambda img, k: img.repeat(k, 0).repeat(k, 1)  # noqa: E731 (nearest upscaling)
    np.testing.assert_array_equal(cell_at(2, 3), up6(final[2], 3))
    np.testing.assert_array_equal(cell_at(0, 0), up6(base[0], 6))  # the base keeps its blocks
    np.testing.assert_array_equal(cell_at(1, 1), up6(up[1], 3))
    shown, _ = figures.residual_to_uint8(residual)
    np.testing.assert_array_equal(cell_at(0, 2), up6(shown[0], 3))
    # Titles above the cells and labels to their left are drawn in dark pixels.
    title_band = fig[:height - pad - n * (cell + pad)]
    label_band = fig[:, :width - 4 * (cell + pad)]
    assert (title_band < 100).any() and (label_band < 100).any()
    with pytest.raises(ValueError, match="expected 3 each"):
        figures.components_figure(base, up, residual, final[:2])
