"""Parts: the matmuls an executor splits a layer into, and the loop that runs them on the implicit im2col.

A part computes some output channels (rows) from some weight columns, with dense weights (a block),
a CSR matrix or a BSR matrix. The loop takes the images a few at a time, few enough that a chunk's
input copy, gathered rows and products stay in the CPU caches: copy, gather, multiply, write into
the output. No full-size intermediate goes through memory, which is what decides the time of the
layers whose blocks are narrow (a 1x1 conv at 10% density has ~6-50 columns per block). Each chunk
costs a fixed number of torch calls (input copy, one gather, one matmul per part, one write): every
call is a parallel region when torch runs several threads, and on a loaded machine every parallel
region waits for its slowest thread, so fewer and larger calls matter as much as the bytes moved.
With several CPU threads the chunks are spread over as many worker threads, each running its torch
calls on one thread: no call waits for another core, only the layer waits for its last chunk.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from sparsify.runtime.im2col import Im2col, Rows, fill_rows_

CHUNK_ELEMENTS = 1 << 20  # elements of the largest per-chunk tensor (4 MiB in float32)
MIN_ROW_GATHER = 16  # output positions per channel from which the output is written image by image
_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def chunk_pool(threads: int) -> ThreadPoolExecutor:
    """`threads` worker threads whose torch calls run on one thread each (made once per thread count).

    torch.set_num_threads(1) in a worker fixes that worker's own OpenMP and MKL thread count; it also
    moves the process-wide default, which is put back before this returns.
    """
    with _POOLS_LOCK:
        if threads not in _POOLS:
            started = threading.Barrier(threads + 1)
            pool = ThreadPoolExecutor(threads, thread_name_prefix="sparsify-chunks",
                                      initializer=torch.set_num_threads, initargs=(1,))
            for _ in range(threads):  # every worker starts (and runs its initializer) before we go on
                pool.submit(started.wait)
            started.wait()
            torch.set_num_threads(threads)
            _POOLS[threads] = pool
        return _POOLS[threads]


class Part:
    """Output rows computed by one matmul of `weight` (dense, CSR or BSR) with the gathered `columns`."""

    def __init__(self, rows: np.ndarray, columns: np.ndarray, weight: torch.Tensor, bias: torch.Tensor | None):
        self.rows = np.asarray(rows, dtype=np.int64)
        self.columns = np.asarray(columns, dtype=np.int64)
        self.weight = weight  # a sparse weight may have padding rows below `rows`
        index = torch.from_numpy(self.rows).to(weight.device)
        self.bias = None if bias is None else bias.index_select(0, index).unsqueeze(1)
        self.sparse = weight.layout != torch.strided

    def multiply_into(self, gathered: torch.Tensor, out: torch.Tensor) -> None:
        """out = weight @ gathered (+ bias), for out the part's rows of the chunk's product."""
        if not self.sparse:
            if self.bias is None:
                torch.mm(self.weight, gathered, out=out)
            else:
                torch.addmm(self.bias, self.weight, gathered, out=out)
            return
        out.copy_((self.weight @ gathered)[: self.rows.size])
        if self.bias is not None:
            out.add_(self.bias)


class PartsRunner:
    """The parts of one layer run chunk by chunk: one copy of the input, one gather for all parts, one matmul
    per part into a shared product, one write of the product into the output channels."""

    def __init__(self, geometry, parts: list[Part], empty: np.ndarray, bias: torch.Tensor | None, *,
                 device: torch.device, grid_waste_limit: float) -> None:
        self.geometry, self.parts, self.bias, self.device = geometry, parts, bias, device
        self.empty = Rows(empty, device)
        rows = np.concatenate([p.rows for p in parts]) if parts else np.zeros(0, np.int64)
        self.rows = Rows(rows, device)
        source = np.zeros(geometry.out_channels, dtype=np.int64)  # product row of each output channel
        source[rows] = np.arange(rows.size)  # (channels without weights read row 0; fill_rows_ fixes them)
        self.source = torch.from_numpy(source).to(device)
        self.row_bounds = np.cumsum([0] + [p.rows.size for p in parts])
        self.column_bounds = np.cumsum([0] + [p.columns.size for p in parts])
        self.grid_waste_limit = grid_waste_limit
        self.chunk_elements = CHUNK_ELEMENTS
        self.plans: dict[tuple[int, int], tuple[Im2col, torch.Tensor]] = {}

    def plan(self, height: int, width: int) -> tuple[Im2col, torch.Tensor]:
        """The im2col of this input size and the gather index of every part's columns, one after the other."""
        key = (height, width)
        if key not in self.plans:
            im2col = Im2col(self.geometry, height, width, grid_waste_limit=self.grid_waste_limit)
            columns = np.concatenate([p.columns for p in self.parts]) if self.parts else np.zeros(0, np.int64)
            self.plans[key] = (im2col, im2col.index(columns, self.device))
        return self.plans[key]

    def chunk(self, im2col: Im2col, images: int, threads: int) -> int:
        """Images per chunk: the largest per-image tensor times the chunk stays within `chunk_elements`,
        and with several threads, a multiple of `threads` chunks of near-equal size."""
        widest = max(int(self.row_bounds[-1]), int(self.column_bounds[-1]), 1)
        per_image = max(widest * im2col.row_length, 0 if im2col.direct else im2col.sample)
        step = max(1, self.chunk_elements // per_image)
        if threads > 1:
            chunks = math.ceil(math.ceil(images / step) / threads) * threads
            step = max(1, math.ceil(images / chunks))
        return step

    def run(self, images: torch.Tensor) -> torch.Tensor:
        """(N, COUT, OH, OW) output of the parts on `images` (N, CIN, H, W)."""
        n = images.shape[0]
        im2col, index = self.plan(images.shape[2], images.shape[3])
        out = images.new_empty(n, self.geometry.out_channels, im2col.out_h, im2col.out_w)
        threads = torch.get_num_threads() if images.device.type == "cpu" else 1
        step = self.chunk(im2col, n, threads)
        starts = range(0, n if self.parts else 0, step)

        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()  # thread-local in torch

        def run_chunk(start: int) -> None:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                self.run_chunk(images[start:start + step], out[start:start + step], im2col, index)

        if threads > 1 and len(starts) > 1:
            list(chunk_pool(threads).map(run_chunk, starts))
        else:
            for start in starts:
                run_chunk(start)
        fill_rows_(out, self.empty, self.bias)
        return out

    def run_chunk(self, images: torch.Tensor, out: torch.Tensor, im2col: Im2col, index: torch.Tensor) -> None:
        """Copy, gather, multiply and write one chunk of images into its slice of the output."""
        n = images.shape[0]
        gathered = im2col.gather(im2col.view(im2col.buffer(images), n), index)
        product = images.new_empty(int(self.row_bounds[-1]), gathered.shape[1])
        for part, r0, r1, c0, c1 in zip(self.parts, self.row_bounds, self.row_bounds[1:], self.column_bounds,
                                        self.column_bounds[1:]):
            part.multiply_into(gathered[c0:c1], product[r0:r1])
        self.write(out, im2col.output(product, n))

    def write(self, out: torch.Tensor, product: torch.Tensor) -> None:
        """out[:, rows] = product (N, rows, OH, OW): image by image as a row gather where an image's rows are
        long enough (a plain copy of each row), else one index_copy_."""
        if self.rows.slice is not None or out.shape[2] * out.shape[3] < MIN_ROW_GATHER:
            self.rows.write_(out, product)
            return
        for image in range(out.shape[0]):
            torch.index_select(product[image], 0, self.source, out=out[image])
