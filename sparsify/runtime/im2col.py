"""Implicit im2col: the rows of the (CIN*kh*kw, N*OH*OW) column matrix, gathered only where a block needs them.

Column c = (cin, i, j) of a conv's weight matrix multiplies the input channel cin shifted by tap
(i*dh, j*dw). The input is copied once into a zero-padded buffer split into stride phases, (N,
phases, CIN, plane_h, plane_w), where tap i of stride sh lives in phase (i*dh) % sh at row shift
(i*dh) // sh. Then every column is a fixed offset into that buffer, and the rows a block needs are
one `index_select` on an overlapping strided view: each gathered row is N runs of contiguous memory.

Two row layouts: `grid` rows span whole plane rows (plain copies; the GEMM also computes the
positions right of OW and below OH, cut off afterwards), exact rows span OH x OW (no wasted GEMM
columns, but shorter runs to copy). `grid` is used where it computes at most `grid_waste_limit`
times OH x OW positions; each plane has spare zero rows at its bottom so a grid row read from the
last shift stays inside the buffer. A Linear, or a 1x1 conv with stride 1 and no padding, reads
its input in place: no copy at all.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from sparsify.errors import SparsifyError
from sparsify.runtime.base import Geometry

GRID_WASTE_LIMIT = 1.3


def taps(kernel: int, stride: int, dilation: int) -> list[tuple[int, int]]:
    """(phase, shift) of each tap along one axis: padded position oh*stride + i*dilation."""
    return [((i * dilation) % stride, (i * dilation) // stride) for i in range(kernel)]


class Im2col:
    """Where each column of the weight matrix finds its input rows, for one input height and width."""

    def __init__(self, geometry: Geometry, height: int, width: int, *, grid_waste_limit: float = GRID_WASTE_LIMIT):
        self.geometry = geometry
        self.height, self.width = height, width
        self.out_h, self.out_w = geometry.output_size(height, width)
        if self.out_h < 1 or self.out_w < 1:
            raise SparsifyError(f"an input of {height}x{width} is smaller than the layer's kernel "
                                f"{geometry.kernel[0]}x{geometry.kernel[1]} (with its padding and dilation)")
        (kh, kw), (sh, sw), (dh, dw) = geometry.kernel, geometry.stride, geometry.dilation
        taps_h, taps_w = taps(kh, sh, dh), taps(kw, sw, dw)
        self.phases_h = sorted({p for p, _ in taps_h})
        self.phases_w = sorted({p for p, _ in taps_w})
        shift_h, shift_w = max(s for _, s in taps_h), max(s for _, s in taps_w)
        self.rows_used = self.out_h + shift_h  # plane rows a gathered grid row spans
        self.plane_w = self.out_w + shift_w
        # spare rows under each plane: a grid row read from the last shift stays inside the buffer
        self.plane_h = self.rows_used + (shift_h + (1 if shift_w else 0) if shift_h or shift_w else 0)
        self.direct = ((self.plane_h, self.plane_w) == (height, width) and geometry.padding == (0, 0)
                       and geometry.stride == (1, 1))
        self.sample = len(self.phases_h) * len(self.phases_w) * geometry.in_channels * self.plane_h * self.plane_w
        self.grid = self.direct or self.rows_used * self.plane_w <= grid_waste_limit * self.out_h * self.out_w
        self.offsets = self.column_offsets(taps_h, taps_w)

    def column_offsets(self, taps_h, taps_w) -> np.ndarray:
        """Offset of each weight column's first input element inside one sample of the buffer."""
        plane = self.plane_h * self.plane_w
        phase_of = {(a, b): n for n, (a, b) in enumerate((a, b) for a in self.phases_h for b in self.phases_w)}
        tap_offsets = np.array([[phase_of[(a, b)] * self.geometry.in_channels * plane + r * self.plane_w + q
                                 for b, q in taps_w] for a, r in taps_h], dtype=np.int64)
        channels = np.arange(self.geometry.in_channels, dtype=np.int64)[:, None, None] * plane
        return (channels + tap_offsets[None]).reshape(-1)

    @property
    def row_length(self) -> int:
        """Elements of one gathered row per sample."""
        return self.rows_used * self.plane_w if self.grid else self.out_h * self.out_w

    def index(self, columns: np.ndarray, device: torch.device) -> torch.Tensor:
        """The gather index of these weight columns."""
        return torch.from_numpy(self.offsets[columns]).to(device)

    def buffer(self, x: torch.Tensor) -> torch.Tensor:
        """`x` (N, C, H, W) padded (zeros) and split into stride phases (N, phases, C, plane_h, plane_w), flat."""
        if self.direct:
            return x.contiguous().view(-1)
        (sh, sw), (ph, pw) = self.geometry.stride, self.geometry.padding
        padded = F.pad(x, (pw, sw * self.plane_w - self.width - pw, ph, sh * self.plane_h - self.height - ph))
        if (sh, sw) == (1, 1):
            return padded.contiguous().view(-1)
        n, c = x.shape[:2]
        phases = padded.view(n, c, self.plane_h, sh, self.plane_w, sw).permute(0, 3, 5, 1, 2, 4)
        return phases[:, phase_index(self.phases_h)][:, :, phase_index(self.phases_w)].contiguous().view(-1)

    def view(self, flat: torch.Tensor, n: int) -> torch.Tensor:
        """Overlapping view whose row `offset` is that column's input rows: (offsets, N, row)."""
        first = int(self.offsets.max()) + 1
        if self.grid:
            return flat.as_strided((first, n, self.row_length), (1, self.sample, 1))
        return flat.as_strided((first, n, self.out_h, self.out_w), (1, self.sample, self.plane_w, 1))

    def gather(self, view: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The column-matrix rows of `index`: (len(index), N * row_length), contiguous."""
        return view.index_select(0, index).view(index.shape[0], -1)

    def output(self, y: torch.Tensor, n: int) -> torch.Tensor:
        """A GEMM result (R, N * row_length) as (N, R, OH, OW) (a view)."""
        rows = y.shape[0]
        if self.grid:
            y = y.view(rows, n, self.rows_used, self.plane_w)[:, :, : self.out_h, : self.out_w]
        else:
            y = y.view(rows, n, self.out_h, self.out_w)
        return y.transpose(0, 1)


def phase_index(phases: list[int]):
    """Index of the stride phases a layer uses: a slice when they are consecutive (as for any kernel >= stride)."""
    if phases == list(range(phases[0], phases[-1] + 1)):
        return slice(phases[0], phases[-1] + 1)
    return torch.tensor(phases)


class Rows:
    """Output channels one part of an executor writes: a slice when they are consecutive, else an index."""

    def __init__(self, rows: np.ndarray, device: torch.device) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        self.count = int(rows.size)
        consecutive = rows.size > 0 and np.array_equal(rows, np.arange(rows[0], rows[0] + rows.size))
        self.slice = slice(int(rows[0]), int(rows[0]) + rows.size) if consecutive else None
        self.index = torch.from_numpy(rows).to(device)

    def write_(self, out: torch.Tensor, values: torch.Tensor) -> None:
        """out[:, rows] = values, for out (N, COUT, ...) and values (N, len(rows), ...)."""
        if self.slice is not None:
            out[:, self.slice].copy_(values)
        else:
            out.index_copy_(1, self.index, values)


def fill_rows_(out: torch.Tensor, rows: Rows, bias: torch.Tensor | None) -> None:
    """Output channels with no kept weight: their bias (or zero) everywhere."""
    if rows.count == 0:
        return
    if bias is None:
        out.index_fill_(1, rows.index, 0)
        return
    values = bias.index_select(0, rows.index).view(1, -1, *([1] * (out.dim() - 2)))
    rows.write_(out, values.expand(out.shape[0], -1, *out.shape[2:]))
