// 10_1_hf_swiglu.cu: chapter 10, step 1: 03_4's up-projection on Hugging Face's own weights.
//
// transformers keeps each expert's gate rows and up rows I rows apart: gate_up_proj (E, 2I, H).
// 03_4's SwiGLU epilogue needs gate_j and up_j in neighbouring columns of its accumulators, that
// is, in neighbouring rows of W's tile in shared memory. Copying the weights interleaved on each
// call would read and write all of them (Qwen3-30B-A3B: 1.2 GB a layer, more than the GEMM
// reads) and miss an optimizer's update unless redone. The tensor map changes instead: a 4-D
// view of gate_up_proj, (H, 2, I, E) with its own strides (moe_course/tma.py:
// tensor_map_gate_up), whose box (64, 2, BN/2, 1) lands (gate_j, up_j) pairs in consecutive
// rows: byte for byte the tile 03_4 reads from the interleaved copy. Past the expert's last
// pair the box reads zeros, never the next expert's rows.
//
// What changes from 03_4: the producer's load of W (GateUpProducer below).
#include "03_4_swiglu.cu"

struct GateUpProducer : GatherProducer {  // 03_3's gathered rows of X; W through the 4-D map
    int expert, pair0;  // the tile's expert and its first (gate, up) pair

    __device__ void begin_tile(const Problem& p, int e, int n, int row0, int row_end) {
        GatherProducer::begin_tile(p, e, n, row0, row_end);
        expert = e;
        pair0 = n * (BN / 2);  // BN columns of the interleaved H: BN / 2 pairs
    }
    __device__ void issue(Slot& slot, u64* full, const Problem&, int, int, int, int kt) {
        mbar_arrive_expect_tx(full, BN * BK * 2);  // W's bytes only: X's rows arrive by themselves
        tma_load_4d(slot.b, map_w, kt * BK, 0, pair0, expert, full);
    }
};

extern "C" __global__ void __launch_bounds__(THREADS, 1)
hf_swiglu_grouped_gemm(const __grid_constant__ TmaDesc map_gate_up, const bf16* __restrict__ X,
                       const int* __restrict__ gather_idx, bf16* __restrict__ H, bf16* __restrict__ A,
                       const int* __restrict__ offs, const TileInfo* __restrict__ tile_map,
                       int* __restrict__ num_tiles, int M, int N, int K, int tokens, int group_m) {
    const Problem p{offs, tile_map, num_tiles, M, N, K, group_m};
    warp_specialized_grouped_gemm(p, GateUpProducer{{{map_gate_up, map_gate_up}, X, gather_idx, tokens}},
                                  SwigluEpilogue{{H}, A});
}
