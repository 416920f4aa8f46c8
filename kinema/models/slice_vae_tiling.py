"""Spatial tiling for the Slice VAE: run a function on overlapping tiles and blend the seams linearly."""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kinema.errors import KinemaError


@dataclass(frozen=True)
class Tiling:
    """Square tiles of `tile_size` pixels; neighbouring tiles overlap by `overlap` of a tile and are blended linearly.

    The defaults are V3's `tile_sample_min_size` (384) and `tile_overlap_factor` (0.25). As in V3, a clip is only
    tiled when its height or width exceeds `tile_size`.
    """

    tile_size: int = 384
    overlap: float = 0.25

    def __post_init__(self) -> None:
        if not (isinstance(self.tile_size, int) and self.tile_size > 0):
            raise KinemaError(f"Tiling tile_size must be a positive number of pixels; got {self.tile_size!r}.")
        if not 0.0 <= self.overlap < 1.0:
            raise KinemaError(f"Tiling overlap must be in [0, 1) (a fraction of a tile); got {self.overlap!r}.")

    def latent_grid(self, spatial_ratio: int) -> tuple[int, int]:
        """`(tile, stride)` in latent pixels for a VAE that downsamples H and W by `spatial_ratio`."""
        if self.tile_size % spatial_ratio:
            raise KinemaError(
                f"Tiling tile_size must be a multiple of the VAE's {spatial_ratio}x downsampling; got "
                f"{self.tile_size}. Use e.g. {max(spatial_ratio, self.tile_size // spatial_ratio * spatial_ratio)}."
            )
        tile = self.tile_size // spatial_ratio
        stride = int(tile * (1 - self.overlap))
        if stride < 1:
            raise KinemaError(f"Tiling of {self.tile_size} px with overlap {self.overlap} leaves no stride; "
                              "use a larger tile or a smaller overlap.")
        return tile, stride


def _blend(prev: torch.Tensor, cur: torch.Tensor, dim: int, extent: int) -> None:
    """Cross-fade the first `extent` rows (dim -2) or columns (dim -1) of `cur` in place from `prev`'s last ones."""
    n = min(prev.shape[dim], cur.shape[dim], extent)
    if n == 0:
        return
    shape = [1] * cur.ndim
    shape[dim] = n
    w = (torch.arange(n, device=cur.device, dtype=torch.float32) / n).to(cur.dtype).view(shape)
    head = cur.narrow(dim, 0, n)
    head.copy_(prev.narrow(dim, prev.shape[dim] - n, n) * (1 - w) + head * w)


def tiled_map(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile_in: int, stride_in: int,
              tile_out: int, stride_out: int) -> torch.Tensor:
    """Apply `fn` to overlapping spatial tiles of `x` and stitch: `(B, C, T, H, W) -> (B, C', T', H', W')`.

    Tiles are `tile_in` square and start every `stride_in` input pixels; `fn` maps a tile to `tile_out` (the same
    scale as `stride_out / stride_in`). In raster order each tile's first `tile_out - stride_out` rows and columns are
    blended with its (already blended) upper and left neighbours, then each keeps its first `stride_out` rows and
    columns, so H' = H * stride_out / stride_in. Only the previous row of tiles is held, not the whole grid.
    """
    extent = tile_out - stride_out
    prev_row: list[torch.Tensor] = []
    kept_rows = []
    for i in range(0, x.shape[-2], stride_in):
        row: list[torch.Tensor] = []
        for j in range(0, x.shape[-1], stride_in):
            tile = fn(x[..., i:i + tile_in, j:j + tile_in])
            if prev_row:
                _blend(prev_row[len(row)], tile, -2, extent)
            if row:
                _blend(row[-1], tile, -1, extent)
            row.append(tile)
        kept_rows.append(torch.cat([t[..., :stride_out, :stride_out] for t in row], dim=-1))
        prev_row = row
    return torch.cat(kept_rows, dim=-2)
