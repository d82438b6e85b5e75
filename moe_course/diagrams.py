"""Pictures of chapter 02's kernels: which thread computes what, and where the bytes go.

Each picture is drawn from an index formula of the kernel it shows, written here once in Python
beside the kernel line it comes from. ``tests/test_diagrams.py`` runs the kernels' own device
code on the CPU (:mod:`moe_course.cuda_on_cpu`) wherever it is plain CUDA C (the tile map, the
128-byte swizzle, the store of a wgmma accumulator) and checks that these formulas give the same
answers; the fragments of ``ldmatrix`` and ``mma.sync`` (PTX, which only a GPU runs) follow the
PTX ISA and are checked to hand every element to exactly one lane.

Shared memory, as these pictures count it: 32 banks of 4 bytes. One warp-wide access takes as
many passes (*wavefronts*) as the largest number of different 4-byte words it needs from any
one bank; a word that several threads read is broadcast, for free. A bank conflict is a pass
more than the bytes need. (The usual model; Nsight Compute counts the same wavefronts.)
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

BANKS = 32  # shared-memory banks
BANK_BYTES = 4  # each bank serves one 4-byte word per pass
LINE_BYTES = 128  # an L1 cache line: what one uncoalesced load pays for
CHUNK_BYTES = 16  # cp.async, ldmatrix rows, uint4: the 16-byte unit of every tiled step
GRID_COLOR = "#d0d7de"
CONFLICT_COLOR = "#cf222e"


# ----------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Tile:
    """One M-tile of the tile map (``TileInfo`` in grouped_gemm.cuh): its expert, its first row,
    and how many of its ``block_m`` rows the expert fills (fewer in an expert's last tile)."""

    expert: int
    row: int
    rows: int


def tiles(counts, block_m: int) -> list[Tile]:
    """The tiles ``build_tile_map`` (grouped_gemm.cuh) writes, in order: each expert's rows cut
    into ``block_m``-row tiles, experts one after the other, an expert with no rows no tile."""
    counts = [int(c) for c in (counts.tolist() if hasattr(counts, "tolist") else counts)]
    if block_m < 1:
        raise ValueError(f"block_m must be a positive number of rows, got {block_m}")
    if any(c < 0 for c in counts):
        raise ValueError(f"counts must be rows per expert (>= 0), got {counts}")
    out, start = [], 0
    for e, c in enumerate(counts):
        out += [Tile(e, start + j * block_m, min(block_m, c - j * block_m)) for j in range(math.ceil(c / block_m))]
        start += c
    return out


def naive_warp_lines(block: tuple[int, int] = (16, 16), warp: int = 32) -> tuple[int, int]:
    """Cache lines that one warp's two loads touch at one step ``k`` of the naive kernels
    (02_1, 02_2: ``X[row * K + k]`` with ``row = row0 + threadIdx.y`` and ``w[k]`` with
    ``w = W + (expert * N + col) * K``, ``col = blockIdx.x * 16 + threadIdx.x``): (lines of X,
    lines of W). Threads fill a warp x first; rows of X and of W are K values apart, more than a
    line for every K of the course (K >= 64), so each distinct row is a line of its own."""
    bx, by = block
    if bx < 1 or by < 1 or warp < 1:
        raise ValueError(f"block and warp sizes must be positive, got block {block}, warp {warp}")
    threads = range(min(warp, bx * by))
    return len({t // bx for t in threads}), len({t % bx for t in threads})


def wavefronts(addresses, access_bytes: int = 4) -> int:
    """Passes shared memory needs to serve one warp-wide access: threads read ``access_bytes``
    each, from the byte ``addresses`` given (one per thread; repeats are broadcast)."""
    if access_bytes % BANK_BYTES or access_bytes < BANK_BYTES:
        raise ValueError(f"access_bytes must be a multiple of {BANK_BYTES}, got {access_bytes}")
    words = defaultdict(set)  # bank -> distinct words wanted from it
    for a in set(int(a) for a in addresses):
        if a % access_bytes:
            raise ValueError(f"address {a} is not aligned to its {access_bytes}-byte access")
        for word in range(a // BANK_BYTES, (a + access_bytes) // BANK_BYTES):
            words[word % BANKS].add(word)
    return max((len(w) for w in words.values()), default=0)


def min_wavefronts(addresses, access_bytes: int = 4) -> int:
    """The passes the bytes alone need (128 bytes a pass): what a conflict-free layout takes."""
    return math.ceil(len(set(addresses)) * access_bytes / (BANKS * BANK_BYTES))


def ldmatrix_rows(row_bytes: int, first_byte: int = 0) -> list[int]:
    """Byte addresses of the 8 rows of one 8x8 bf16 matrix that ``ldmatrix`` reads (16 bytes a
    row) from a tile whose rows are ``row_bytes`` apart: 02_4's rows are ``LDS = BK + 8`` bf16."""
    return [first_byte + r * row_bytes for r in range(8)]


def swizzle_128b(row: int, chunk: int) -> int:
    """Where the 16-byte ``chunk`` (0-7) of ``row`` lies in a tile of 128-byte rows, counted in
    chunks: ``swizzle_128b`` of grouped_gemm.cuh, ``row * 8 + (chunk ^ (row & 7))``."""
    return row * 8 + (chunk ^ (row & 7))


def column_addresses(chunk: int, rows: int = 8, swizzled: bool = True) -> list[int]:
    """Byte addresses of logical chunk ``chunk`` of rows 0..rows-1 of a [rows][64 bf16] tile:
    what one 8x8 matrix of a k16 step reads (8 rows, the same 16 bytes of K in each)."""
    return [CHUNK_BYTES * (swizzle_128b(r, chunk) if swizzled else r * 8 + chunk) for r in range(rows)]


def ldmatrix_a_owner(row: int, col: int) -> tuple[int, int, int]:
    """(lane, register, half) that holds element (row, col) of a 16x16 bf16 A tile after 02_4's
    ``ldmatrix_x4``: matrix j = row // 8 + 2 * (col // 8) lands in register j; within an 8x8
    matrix, lane 4 * (row % 8) + (col % 8) // 2 holds two neighbours, low half first (PTX ISA,
    ``ldmatrix``; the same order ``mma.sync.m16n8k16`` wants for A)."""
    _check_range(row, 16, "row")
    _check_range(col, 16, "col")
    return 4 * (row % 8) + (col % 8) // 2, row // 8 + 2 * (col // 8), col % 2


def ldmatrix_address_lane(row: int, col: int) -> int:
    """The lane that gives ``ldmatrix_x4`` the address of the 16-byte row holding (row, col) of
    the A tile: 02_4 passes ``&a[(lane % 16) * LDS + (lane / 16) * 8]``."""
    _check_range(row, 16, "row")
    _check_range(col, 16, "col")
    return row + 16 * (col // 8)


def mma_accumulator_owner(row: int, col: int) -> tuple[int, int]:
    """(lane, value) of the fp32 element (row, col) of an m16n8 ``mma.sync`` accumulator, as
    02_4's epilogue stores it: values 0, 1 at row lane / 4, columns 2 * (lane % 4) + {0, 1};
    values 2, 3 eight rows down."""
    _check_range(row, 16, "row")
    _check_range(col, 8, "col")
    return 4 * (row % 8) + col // 2, 2 * (row // 8) + col % 2


def wgmma_accumulator_owner(row: int, col: int) -> tuple[int, int]:
    """(thread of the warpgroup, value index) of element (row, col) of a 64 x N wgmma accumulator,
    inverting ``store_wgmma_tile`` (grouped_gemm.cuh): value v of thread t sits at
    row 16 (t / 32) + (t % 32) / 4 + 8 ((v / 2) % 2), col 8 (v / 4) + 2 (t % 4) + v % 2."""
    _check_range(row, 64, "row")
    if col < 0:
        raise ValueError(f"col must be >= 0, got {col}")
    warp, r = divmod(row, 16)
    thread = 32 * warp + 4 * (r % 8) + (col % 8) // 2
    return thread, 4 * (col // 8) + 2 * (r // 8) + col % 2


def persistent_order(num_m_tiles: int, n_tiles: int, blocks: int) -> list[tuple[int, int, int, int]]:
    """(block, round, m_tile, n_tile) for every tile of 02_6_persistent: tile t goes to block
    t % gridDim.x in round t // gridDim.x; the n_tiles of one M-tile are numbered together
    (``t / n_tiles``, ``t % n_tiles``)."""
    if min(num_m_tiles, n_tiles, blocks) < 0 or blocks == 0:
        raise ValueError(f"tile counts must be >= 0 and blocks > 0, got {num_m_tiles}, {n_tiles}, {blocks}")
    return [(t % blocks, t // blocks, t // n_tiles, t % n_tiles) for t in range(num_m_tiles * n_tiles)]


def _check_range(value: int, size: int, name: str) -> None:
    if not 0 <= value < size:
        raise ValueError(f"{name} must be in 0..{size - 1}, got {value}")


# ----------------------------------------------------------------------------- drawing


def _axes(ax, figsize):
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def _expert_colors(n: int):
    return plt.get_cmap("tab10")(np.arange(max(n, 1)) % 10)


def _grid(ax, rows: int, cols: int, **kw) -> None:
    for r in range(rows + 1):
        ax.plot([0, cols], [r, r], color=kw.get("color", GRID_COLOR), lw=kw.get("lw", 0.5))
    for c in range(cols + 1):
        ax.plot([c, c], [0, rows], color=kw.get("color", GRID_COLOR), lw=kw.get("lw", 0.5))


def _matrix_axes(ax, rows: int, cols: int) -> None:
    ax.set_xlim(-0.2, cols + 0.2)
    ax.set_ylim(rows + 0.2, -0.2)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)


def draw_naive_warp(k: int = 5, values: int = 64, ax=None):
    """02_1 / 02_2: what one warp (16 x 2 threads of a 16 x 16 block) reads at step ``k`` of its
    dot products: one bf16 in each of 16 rows of W and 2 rows of X, every row its own cache line."""
    x_lines, w_lines = naive_warp_lines()
    ax = _axes(ax, (10, 3.6))
    rows = x_lines + 1 + w_lines
    for r in range(rows):
        if r == x_lines:
            continue  # a gap between X and W
        ax.add_patch(Rectangle((0, r), values, 1, facecolor="#f6f8fa", edgecolor="#57606a", lw=0.8))
        ax.add_patch(Rectangle((k, r), 1, 1, facecolor=CONFLICT_COLOR))
    ax.text(-1, x_lines / 2, f"X: {x_lines} rows\n(threadIdx.y)", ha="right", va="center", fontsize=8)
    ax.text(-1, x_lines + 1 + w_lines / 2, f"W[e]: {w_lines} rows\n(threadIdx.x: one\ncolumn of Y each)",
            ha="right", va="center", fontsize=8)
    ax.text(values + 1, rows / 2, f"each grey bar: one\n{LINE_BYTES}-byte cache line\n({values} bf16 of K)\n\n"
            f"red: the 2 bytes\nper line the warp\nuses at step k = {k}", va="center", fontsize=8)
    ax.set_xlim(-14, values + 18)
    ax.set_ylim(rows + 0.5, -0.5)
    ax.axis("off")
    ax.set_title(f"one warp, one step of K: 32 multiply-adds need {x_lines + w_lines} cache lines "
                 f"({x_lines} of X, {w_lines} of W)", fontsize=9)
    return ax


def draw_tile_map(counts, block_m: int, ax=None):
    """02_2: the rows of X sorted by expert (top), and the tile map built on the GPU (bottom):
    one tile per ``block_m`` rows of an expert, its empty part hatched, then the tiles the grid
    launches for nothing (expert -1) up to the bound ceil(M / block_m) + E the host knows."""
    tl = tiles(counts, block_m)
    counts = [int(c) for c in (counts.tolist() if hasattr(counts, "tolist") else counts)]
    M, E = sum(counts), len(counts)
    max_tiles = math.ceil(M / block_m) + E
    colors = _expert_colors(E)
    ax = _axes(ax, (12, 2.8))
    start = 0
    for e, c in enumerate(counts):
        if c:
            ax.add_patch(Rectangle((start, 2.2), c, 0.8, facecolor=colors[e], edgecolor="white"))
            ax.text(start + c / 2, 2.6, f"expert {e}\n{c} rows", ha="center", va="center", fontsize=7)
        start += c
    width = max(M, 1) / max(max_tiles, 1)  # the tiles drawn side by side under the rows
    for t in range(max_tiles):
        x = t * width
        if t < len(tl):
            tile = tl[t]
            full = tile.rows / block_m
            ax.add_patch(Rectangle((x, 0.6), width * full, 0.9, facecolor=colors[tile.expert], edgecolor="none"))
            ax.add_patch(Rectangle((x + width * full, 0.6), width * (1 - full), 0.9, facecolor="white",
                                   edgecolor="none", hatch="///"))
            ax.plot([tile.row + tile.rows / 2, x + width / 2], [2.2, 1.5], color=colors[tile.expert], lw=0.6)
            label = f"t{t}\n({tile.expert},{tile.row})"
        else:
            ax.add_patch(Rectangle((x, 0.6), width, 0.9, facecolor="#eaeef2", edgecolor="none"))
            label = f"t{t}\n(-1)"
        ax.add_patch(Rectangle((x, 0.6), width, 0.9, facecolor="none", edgecolor="#57606a", lw=0.6))
        ax.text(x + width / 2, 0.3, label, ha="center", va="top", fontsize=6)
    padded = sum(block_m - t.rows for t in tl)
    ax.set_xlim(0, max(M, 1))
    ax.set_ylim(-0.6, 3.1)
    ax.axis("off")
    ax.set_title(f"{M} rows of {E} experts in tiles of {block_m}: {len(tl)} tiles ({padded} padded rows, hatched), "
                 f"{max_tiles - len(tl)} of the ceil(M/{block_m}) + E = {max_tiles} launched exit at once (grey)",
                 fontsize=9)
    return ax


def draw_thread_tile(block: int = 128, per_thread: int = 8, threads=((0, 0), (5, 0), (0, 9)), ax=None):
    """02_3: the 128 x 128 tile of Y of one block, 16 x 16 threads of 8 x 8 outputs each; the
    slices of A (X's rows) and B (W's rows) in shared memory that the named threads (tx, ty) read:
    threads of one ty read the same rows of As, threads of one tx the same rows of Bs."""
    n = block // per_thread  # threads along each side
    ax = _axes(ax, (6.5, 6.5))
    slice_w = n / 4  # the K slice drawn as a strip beside the tile
    ax.add_patch(Rectangle((0, 0), n, n, facecolor="#f6f8fa", edgecolor="#57606a"))
    ax.add_patch(Rectangle((-slice_w - 0.5, 0), slice_w, n, facecolor="#f6f8fa", edgecolor="#57606a"))
    ax.add_patch(Rectangle((0, -slice_w - 0.5), n, slice_w, facecolor="#f6f8fa", edgecolor="#57606a"))
    _grid(ax, n, n)
    for i, (tx, ty) in enumerate(threads):
        color = plt.get_cmap("tab10")(i)
        ax.add_patch(Rectangle((tx, ty), 1, 1, facecolor=color))
        part = slice_w / len(threads)  # side by side: threads that share rows of As (or Bs) show it
        ax.add_patch(Rectangle((-slice_w - 0.5 + i * part, ty), part, 1, facecolor=color))
        ax.add_patch(Rectangle((tx, -slice_w - 0.5 + i * part), 1, part, facecolor=color))
        ax.text(tx + 0.5, ty + 0.5, f"{tx},{ty}", ha="center", va="center", fontsize=5, color="white")
    ax.text(-slice_w / 2 - 0.5, n + 0.3, f"As: X's {block} rows\nx BK values of K", ha="center", va="top", fontsize=7)
    ax.text(n + 0.3, -slice_w / 2 - 0.5, f"Bs: W's {block} rows\nx BK values of K", ha="left", va="center", fontsize=7)
    ax.set_xlim(-slice_w - 1, n + 5)
    ax.set_ylim(n + 2, -slice_w - 1)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(f"one block: a {block} x {block} tile of Y, {n} x {n} threads (tx, ty) of {per_thread} x "
                 f"{per_thread} outputs;\nper k, a thread reads {per_thread} values of As and {per_thread} of Bs "
                 f"for {per_thread * per_thread} multiply-adds", fontsize=9)
    return ax


def draw_ldmatrix(ax=None):
    """02_4: a 16 x 16 A tile after ``ldmatrix_x4``: colour = register (the four 8x8 matrices),
    number = the lane that holds the pair; left, the lane that gives each row's address."""
    ax = _axes(ax, (7.5, 7))
    colors = ["#ddf4ff", "#fff8c5", "#ffebe9", "#dafbe1"]
    for row in range(16):
        for col in range(0, 16, 2):
            lane, reg, _ = ldmatrix_a_owner(row, col)
            ax.add_patch(Rectangle((col, row), 2, 1, facecolor=colors[reg], edgecolor=GRID_COLOR, lw=0.5))
            ax.text(col + 1, row + 0.5, str(lane), ha="center", va="center", fontsize=6)
        for half in range(2):
            ax.text(-0.3 + 16.6 * half, row + 0.5, f"lane {ldmatrix_address_lane(row, 8 * half)}",
                    ha="right" if half == 0 else "left", va="center", fontsize=6, color="#57606a")
    for j in range(4):
        r0, c0 = 8 * (j % 2), 8 * (j // 2)
        ax.add_patch(Rectangle((c0, r0), 8, 8, facecolor="none", edgecolor="black", lw=1.2))
        ax.text(c0 + 4, r0 + 4, f"a{j}", ha="center", va="center", fontsize=22, color="black", alpha=0.12)
    _matrix_axes(ax, 16, 16)
    ax.set_xlim(-4, 20)
    ax.set_xticks([0.5, 15.5], ["k 0", "k 15"], fontsize=7)
    ax.set_title("ldmatrix.x4: a 16 x 16 bf16 tile of A into 4 registers of every lane\n"
                 "cell = 2 values of K (a 32-bit register), number = the lane holding them; "
                 "grey = the lane giving that row's address", fontsize=9)
    return ax


def draw_banks(rows_addresses: dict[str, list[int]], access_bytes: int = CHUNK_BYTES, ax=None):
    """Where each access of one warp-wide read falls among the 32 banks, one panel row per access
    set: ``{label: byte addresses}``; a bank wanted twice for different words is red, and the
    title of each says how many passes it takes against the fewest the bytes need."""
    ax = _axes(ax, (10, 1.2 + 1.4 * len(rows_addresses)))
    y = 0
    for label, addresses in rows_addresses.items():
        need = defaultdict(set)
        for a in addresses:
            for word in range(a // BANK_BYTES, (a + access_bytes) // BANK_BYTES):
                need[word % BANKS].add(word)
        for i, a in enumerate(addresses):
            first = (a // BANK_BYTES) % BANKS
            for b in range(first, first + access_bytes // BANK_BYTES):
                bank = b % BANKS
                clash = len(need[bank]) > 1
                ax.add_patch(Rectangle((bank, y + i), 1, 1, facecolor=CONFLICT_COLOR if clash else "#54aeff",
                                       edgecolor="white", lw=0.5))
            ax.text(-0.5, y + i + 0.5, f"byte {a}", ha="right", va="center", fontsize=6)
        passes, least = wavefronts(addresses, access_bytes), min_wavefronts(addresses, access_bytes)
        ax.text(BANKS / 2, y - 0.4, f"{label}: {passes} pass{'es' if passes > 1 else ''} "
                f"({least} without conflicts)", ha="center", va="bottom", fontsize=8)
        _grid_block(ax, y, len(addresses))
        y += len(addresses) + 2
    ax.set_xlim(-6, BANKS + 0.5)
    ax.set_ylim(y - 1, -1.5)
    ax.set_xticks(np.arange(0, BANKS, 4) + 0.5, [str(b) for b in range(0, BANKS, 4)])
    ax.set_yticks([])
    ax.set_xlabel("shared-memory bank (4 bytes each)")
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    return ax


def _grid_block(ax, y: int, rows: int) -> None:
    for r in range(rows + 1):
        ax.plot([0, BANKS], [y + r, y + r], color=GRID_COLOR, lw=0.4)


def draw_swizzle(rows: int = 8, highlight: int = 0, axes=None):
    """02_5: a [rows][64 bf16] tile in shared memory, 8 chunks of 16 bytes a row (one row = all 32
    banks). Left plain, right with the 128-byte swizzle: the number in each place is the logical
    chunk stored there; chunk ``highlight`` of every row in red: the column a k16 step reads."""
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, swizzled in zip(axes, (False, True)):
        for r in range(rows):
            for c in range(8):
                place = (swizzle_128b(r, c) if swizzled else r * 8 + c) - r * 8
                hot = c == highlight
                ax.add_patch(Rectangle((place, r), 1, 1, facecolor=CONFLICT_COLOR if hot else "#ddf4ff",
                                       edgecolor="white"))
                ax.text(place + 0.5, r + 0.5, str(c), ha="center", va="center", fontsize=8,
                        color="white" if hot else "black")
        _matrix_axes(ax, rows, 8)
        ax.set_xticks(np.arange(8) + 0.5, [f"{4 * g}-{4 * g + 3}" for g in range(8)], fontsize=6)
        ax.set_xlabel("banks (16-byte chunk position in the row)", fontsize=8)
        ax.set_yticks(np.arange(rows) + 0.5, [f"row {r}" for r in range(rows)], fontsize=7)
        passes = wavefronts(column_addresses(highlight, rows, swizzled), CHUNK_BYTES)
        ax.set_title(f"{'128-byte swizzle: chunk c at c ^ (row % 8)' if swizzled else 'plain: chunk c at c'}\n"
                     f"reading chunk {highlight} of {rows} rows: {passes} pass{'es' if passes > 1 else ''}",
                     fontsize=9)
    return axes


def draw_wgmma_accumulator(cols: int = 16, axes=None):
    """02_5 / 02_6: the 64 x N fp32 accumulator of one warpgroup's wgmma. Left: the warp owning
    each row (16 rows a warp); right: the corner of warp 0, each pair of columns labelled with
    the thread holding it and its value indices (``store_wgmma_tile``'s layout)."""
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(12, 5.5), gridspec_kw={"width_ratios": [1, 1.6]})
    left, right = axes
    warp_colors = plt.get_cmap("Pastel1")(np.arange(4))
    for row in range(64):
        left.add_patch(Rectangle((0, row), cols, 1, facecolor=warp_colors[row // 16], edgecolor="none"))
    for w in range(4):
        left.text(cols / 2, 16 * w + 8, f"warp {w}\nrows {16 * w}-{16 * w + 15}", ha="center", va="center", fontsize=9)
    _matrix_axes(left, 64, cols)
    left.set_title(f"64 rows x {cols} of the N columns:\n4 warps, 16 rows each", fontsize=9)
    for row in range(16):
        for col in range(0, cols, 2):
            t, v = wgmma_accumulator_owner(row, col)
            right.add_patch(Rectangle((col, row), 2, 1, facecolor=plt.get_cmap("tab20")(t % 4 * 2 + 1),
                                      edgecolor="white", lw=0.5))
            right.text(col + 1, row + 0.5, f"t{t}\n{v},{v + 1}", ha="center", va="center", fontsize=5.5)
    _matrix_axes(right, 16, cols)
    right.set_title(f"warp 0, rows 0-15 x columns 0-{cols - 1}:\nthread t holds its accumulator's "
                    f"values v, v+1 there", fontsize=9)
    return axes


def draw_persistent(counts, block_m: int, n_tiles: int, blocks: int, axes=None):
    """02_5 against 02_6 on a small problem. Left: 02_5's grid, one block per (N-tile, M-tile)
    of the upper bound ceil(M / block_m) + E, the tiles with no expert grey. Right: 02_6, one
    block per SM walking the real tiles t, t + blocks, ...: which tile each block runs in each
    round, coloured by expert."""
    tl = tiles(counts, block_m)
    E = len(counts)
    M = sum(int(c) for c in counts)
    max_tiles = math.ceil(M / block_m) + E
    colors = _expert_colors(E)
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [1, 1.4]})
    left, right = axes
    for m in range(max_tiles):
        for nt in range(n_tiles):
            face = colors[tl[m].expert] if m < len(tl) else "#eaeef2"
            left.add_patch(Rectangle((nt, m), 1, 1, facecolor=face, edgecolor="white"))
    _matrix_axes(left, max_tiles, n_tiles)
    left.set_yticks(np.arange(max_tiles) + 0.5, [f"M-tile {m}" for m in range(max_tiles)], fontsize=6)
    left.set_xticks(np.arange(n_tiles) + 0.5, [f"N {nt}" for nt in range(n_tiles)], fontsize=6)
    left.set_title(f"02_5: a grid of {n_tiles} x {max_tiles} blocks, {n_tiles * (max_tiles - len(tl))} "
                   f"with nothing to do (grey)", fontsize=9)
    order = persistent_order(len(tl), n_tiles, blocks)
    rounds = max((r for _, r, _, _ in order), default=0) + 1
    for b, r, m, nt in order:
        right.add_patch(Rectangle((r, b), 1, 1, facecolor=colors[tl[m].expert], edgecolor="white"))
        right.text(r + 0.5, b + 0.5, f"{m},{nt}", ha="center", va="center", fontsize=6)
    _matrix_axes(right, blocks, rounds)
    right.set_yticks(np.arange(blocks) + 0.5, [f"block {b}" for b in range(blocks)], fontsize=6)
    right.set_xticks(np.arange(rounds) + 0.5, [str(r) for r in range(rounds)], fontsize=6)
    right.set_xlabel("round of the block's loop", fontsize=8)
    right.set_title(f"02_6: {blocks} blocks (one per SM) walk the {len(tl) * n_tiles} real tiles "
                    f"(label: M-tile, N-tile)", fontsize=9)
    return axes


__all__ = ["Tile", "tiles", "naive_warp_lines", "wavefronts", "min_wavefronts", "ldmatrix_rows", "swizzle_128b",
           "column_addresses", "ldmatrix_a_owner", "ldmatrix_address_lane", "mma_accumulator_owner",
           "wgmma_accumulator_owner", "persistent_order", "draw_naive_warp", "draw_tile_map", "draw_thread_tile",
           "draw_ldmatrix", "draw_banks", "draw_swizzle", "draw_wgmma_accumulator", "draw_persistent"]
