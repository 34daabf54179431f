// The rasterizer's CUDA kernels behind XLA's FFI (built at first use by kernels/cuda_ops.py; the thresholds come
// from kernels/reference.py as -D defines).
//
// Step 2, pair expansion: each slot gets its (tile, depth rank) pair, or "no pair" for a tile no pixel can take;
// the same pairs as kernels/binning.expand_pairs, in one pass instead of a scatter, a running max and per-slot
// gathers.
//
// Steps 3-4, compositing: the same pair records, tile ranges, outputs and arithmetic as kernels/pallas_composite.py,
// plus what Pallas-Triton does not expose: each batch of a tile's pair records is staged once in shared memory for
// all 256 pixels, warp votes skip the pairs no pixel of a warp takes, and a warp's per-pair gradients are reduced
// for all ten fields at once (a reduce-scatter butterfly, 12 shuffles instead of 50). Gradients go to the pair's
// own slot (no atomics, deterministic); the caller sums them per Gaussian.

#include <cuda_runtime.h>

#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kTile = 16;
constexpr int kPixels = kTile * kTile;  // one thread per pixel of the tile
constexpr int kWarps = kPixels / 32;
constexpr int kFields = 10;             // mean x, y; conic xx, xy, yy; opacity; r, g, b, depth
constexpr int kPairs2 = kFields / 2;    // a record as float2s (rows are 40 bytes, so 8-byte aligned)
constexpr int kFwdBatch = kPixels;      // pairs staged per forward batch
constexpr int kBwdBatch = 64;           // pairs staged per backward batch (bounded by the partial sums' memory)
constexpr float kAlphaMin = UHAP_ALPHA_MIN;
constexpr float kAlphaMax = UHAP_ALPHA_MAX;
constexpr float kTransEpsilon = UHAP_T_EPSILON;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ void stage(float2* batch, const float* records, int first, int count) {
  const float2* src = reinterpret_cast<const float2*>(records + static_cast<int64_t>(first) * kFields);
  for (int k = threadIdx.x; k < count * kPairs2; k += kPixels) batch[k] = src[k];
}

// One program per (tile, camera), one thread per pixel, front to back over the tile's pairs: per pixel exactly the
// reference's arithmetic; the tile stops at a batch boundary once every pixel is saturated.
__global__ void __launch_bounds__(kPixels) composite_forward(
    const float* __restrict__ records, const int32_t* __restrict__ tile_start, const int32_t* __restrict__ tile_end,
    const float4* __restrict__ background, float4* __restrict__ out, float* __restrict__ trans_out,
    int32_t* __restrict__ last_out, int n_tiles, int tiles_x, int64_t slots) {
  __shared__ float2 batch[kFwdBatch * kPairs2];
  const int tile = blockIdx.x, t = threadIdx.x;
  const int64_t program = static_cast<int64_t>(blockIdx.y) * n_tiles + tile;
  const int start = tile_start[program], end = tile_end[program];
  const float* rec = records + static_cast<int64_t>(blockIdx.y) * slots * kFields;
  const float px = static_cast<float>((tile % tiles_x) * kTile + t % kTile) + 0.5f;
  const float py = static_cast<float>((tile / tiles_x) * kTile + t / kTile) + 0.5f;
  float trans = 1.0f, acc0 = 0.0f, acc1 = 0.0f, acc2 = 0.0f, acc3 = 0.0f;
  int last = -1;
  bool done = false;
  for (int base = start; base < end; base += kFwdBatch) {
    // Also the barrier after which nobody reads the previous batch.
    if (__syncthreads_count(done) == kPixels) break;
    const int count = min(kFwdBatch, end - base);
    stage(batch, rec, base, count);
    __syncthreads();
    for (int j = 0; j < count && !done; ++j) {
      const float2 m = batch[j * kPairs2], c01 = batch[j * kPairs2 + 1], c2o = batch[j * kPairs2 + 2];
      const float dx = m.x - px, dy = m.y - py;
      const float sigma = 0.5f * (c01.x * dx * dx + c2o.x * dy * dy) + c01.y * dx * dy;
      const float alpha = fminf(c2o.y * expf(-sigma), kAlphaMax);
      if (sigma < 0.0f || alpha < kAlphaMin) continue;
      const float next = trans * (1.0f - alpha);
      if (next <= kTransEpsilon) {
        done = true;
        break;
      }
      const float weight = alpha * trans;
      const float2 f01 = batch[j * kPairs2 + 3], f23 = batch[j * kPairs2 + 4];
      acc0 += weight * f01.x;
      acc1 += weight * f01.y;
      acc2 += weight * f23.x;
      acc3 += weight * f23.y;
      trans = next;
      last = base + j;
    }
  }
  const int64_t pixel = program * kPixels + t;
  const float4 bg = background[blockIdx.y];
  out[pixel] = make_float4(acc0 + trans * bg.x, acc1 + trans * bg.y, acc2 + trans * bg.z, acc3 + trans * bg.w);
  trans_out[pixel] = trans;
  last_out[pixel] = last;
}

// One butterfly level over the values in v[0, kCount): lanes with the `offset` bit set keep the upper half
// v[half, kCount), the others the lower half, each sending its partner the half it gives up; the kept pairwise sums
// land in v[0, half) (an odd count's last value pairs with zero).
template <int kCount>
__device__ __forceinline__ void fold(float (&v)[kFields], bool upper, int offset) {
  constexpr int kHalf = (kCount + 1) / 2;
#pragma unroll
  for (int k = 0; k < kHalf; ++k) {
    const float lo = v[k];
    const float hi = k + kHalf < kCount ? v[k + kHalf] : 0.0f;
    v[k] = (upper ? hi : lo) + __shfl_xor_sync(kFullMask, upper ? lo : hi, offset);
  }
}

// The warp's sums of the ten values over its 32 lanes, reduce-scattered in 5 + 3 + 2 + 1 + 1 shuffles (ten
// separate reductions take 50). Returns the sum of field `*field` of this lane, or -1 in `*field` where the lane
// holds none (each field's sum sits in one even lane and its odd neighbour).
__device__ __forceinline__ float warp_sum10(float (&v)[kFields], int lane, int* field) {
  fold<10>(v, lane & 16, 16);  // v[k]: field k + 5 b4
  fold<5>(v, lane & 8, 8);     // v[k]: level-1 slot k + 3 b3
  fold<3>(v, lane & 4, 4);     // v[k]: level-2 slot k + 2 b2
  fold<2>(v, lane & 2, 2);     // v[0]: level-3 slot b1
  const int slot3 = (lane >> 1) & 1, slot2 = slot3 + 2 * ((lane >> 2) & 1), slot1 = slot2 + 3 * ((lane >> 3) & 1);
  *field = (lane % 2 == 0 && slot2 < 3 && slot1 < 5) ? slot1 + 5 * ((lane >> 4) & 1) : -1;
  return v[0] + __shfl_xor_sync(kFullMask, v[0], 1);
}

// Recomputes T front to back as the forward did; the colour behind pair i is (G - prefix_i) with G the output's
// gradient-weighted sum, so there is no reverse pass. Each pair's ten gradients are summed per warp (shuffles),
// then over the 8 warps from shared memory, and written to the pair's slot with coalesced stores.
__global__ void __launch_bounds__(kPixels) composite_backward(
    const float* __restrict__ records, const int32_t* __restrict__ tile_start, const int32_t* __restrict__ tile_end,
    const float4* __restrict__ out, const float* __restrict__ trans_final, const int32_t* __restrict__ last_in,
    const float4* __restrict__ g_out, const float* __restrict__ g_trans, float* __restrict__ g_records, int n_tiles,
    int tiles_x, int64_t slots) {
  __shared__ float2 batch[kBwdBatch * kPairs2];
  __shared__ float partial[kWarps][kBwdBatch * kFields];
  __shared__ int tile_last;
  const int tile = blockIdx.x, t = threadIdx.x, lane = t % 32, warp = t / 32;
  const int64_t program = static_cast<int64_t>(blockIdx.y) * n_tiles + tile;
  const int start = tile_start[program], end = tile_end[program];
  const int64_t pixel = program * kPixels + t;
  const float* rec = records + static_cast<int64_t>(blockIdx.y) * slots * kFields;
  float* g_rec = g_records + static_cast<int64_t>(blockIdx.y) * slots * kFields;
  if (t == 0) tile_last = -1;
  __syncthreads();
  const int last = last_in[pixel];
  atomicMax(&tile_last, last);
  const float4 g = g_out[pixel], o = out[pixel];
  float rest = g.x * o.x + g.y * o.y + g.z * o.z + g.w * o.w + g_trans[pixel] * trans_final[pixel];
  __syncthreads();
  const int stop = max(tile_last + 1, start);  // pairs [start, stop) may have a taker; the rest get zeros
  for (int64_t k = static_cast<int64_t>(stop) * kFields + t; k < static_cast<int64_t>(end) * kFields; k += kPixels) {
    g_rec[k] = 0.0f;
  }
  const float px = static_cast<float>((tile % tiles_x) * kTile + t % kTile) + 0.5f;
  const float py = static_cast<float>((tile / tiles_x) * kTile + t / kTile) + 0.5f;
  float trans = 1.0f;
  for (int base = start; base < stop; base += kBwdBatch) {
    const int count = min(kBwdBatch, stop - base);
    stage(batch, rec, base, count);
    __syncthreads();
    for (int j = 0; j < count; ++j) {
      const float2 m = batch[j * kPairs2], c01 = batch[j * kPairs2 + 1], c2o = batch[j * kPairs2 + 2];
      const float dx = m.x - px, dy = m.y - py;
      const float sigma = 0.5f * (c01.x * dx * dx + c2o.x * dy * dy) + c01.y * dx * dy;
      const float raw = c2o.y * expf(-sigma);
      const float alpha = fminf(raw, kAlphaMax);
      const bool take = base + j <= last && sigma >= 0.0f && alpha >= kAlphaMin;
      if (!__any_sync(kFullMask, take)) {
        if (lane < kFields) partial[warp][j * kFields + lane] = 0.0f;
        continue;
      }
      float v[kFields] = {};
      if (take) {
        const float2 f01 = batch[j * kPairs2 + 3], f23 = batch[j * kPairs2 + 4];
        const float weight = alpha * trans;
        const float g_feat = g.x * f01.x + g.y * f01.y + g.z * f23.x + g.w * f23.y;
        rest -= weight * g_feat;  // now the gradient-weighted colour behind this pair
        const float keep = 1.0f - alpha;
        const float g_alpha = trans * g_feat - rest / keep;
        const float g_sigma = raw <= kAlphaMax ? -raw * g_alpha : 0.0f;
        v[0] = g_sigma * (c01.x * dx + c01.y * dy);
        v[1] = g_sigma * (c01.y * dx + c2o.x * dy);
        v[2] = 0.5f * g_sigma * dx * dx;
        v[3] = g_sigma * dx * dy;
        v[4] = 0.5f * g_sigma * dy * dy;
        v[5] = c2o.y > 0.0f ? -g_sigma / c2o.y : 0.0f;
        v[6] = weight * g.x;
        v[7] = weight * g.y;
        v[8] = weight * g.z;
        v[9] = weight * g.w;
        trans *= keep;
      }
      int field;
      const float sum = warp_sum10(v, lane, &field);
      if (field >= 0) partial[warp][j * kFields + field] = sum;
    }
    __syncthreads();
    for (int k = t; k < count * kFields; k += kPixels) {
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += partial[w][k];
      g_rec[static_cast<int64_t>(base) * kFields + k] = sum;
    }
    // The next batch's staging writes `batch` only; `partial` is rewritten after its barrier.
  }
}

// Every leading dimension is a camera: vmap over frames (ffi_call's "broadcast_all") adds leading dimensions.
// The product of all but the last `trailing` dimensions, or -1 if the buffer has fewer.
template <typename Dims>
int64_t leading(const Dims& dims, size_t trailing) {
  if (dims.size() < trailing) return -1;
  int64_t count = 1;
  for (size_t k = 0; k + trailing < dims.size(); ++k) count *= dims[k];
  return count;
}

ffi::Error check_cameras(const char* what, int64_t cams) {
  if (cams > 65535) return ffi::Error::InvalidArgument(std::string(what) + ": more than 65535 cameras in one call");
  return ffi::Error::Success();
}

ffi::Error launched() {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("uhap rasterizer: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

constexpr int kExpandThreads = 256;

// Whether any pixel centre of the tile can reach alpha >= 1/255: sigma's minimum over the tile's box of pixel
// centres (0 inside, else the least of the four edges' clamped 1-D minima) against ln(255 opacity), with the same
// 1% margin and arithmetic as kernels/binning.tile_hits.
__device__ __forceinline__ bool tile_hits(int tx, int ty, float mx, float my, float a, float b, float c,
                                          float opacity) {
  const float x_lo = static_cast<float>(tx * kTile) + 0.5f - mx, y_lo = static_cast<float>(ty * kTile) + 0.5f - my;
  const float x_hi = x_lo + (kTile - 1), y_hi = y_lo + (kTile - 1);
  if (x_lo <= 0.0f && x_hi >= 0.0f && y_lo <= 0.0f && y_hi >= 0.0f) return 0.0f <= logf(255.0f * opacity) + 0.01f;
  auto sigma = [&](float dx, float dy) { return 0.5f * (a * dx * dx + c * dy * dy) + b * dx * dy; };
  const float lowest = fminf(fminf(sigma(x_lo, fminf(fmaxf(-b * x_lo / c, y_lo), y_hi)),
                                   sigma(x_hi, fminf(fmaxf(-b * x_hi / c, y_lo), y_hi))),
                             fminf(sigma(fminf(fmaxf(-b * y_lo / a, x_lo), x_hi), y_lo),
                                   sigma(fminf(fmaxf(-b * y_hi / a, x_lo), x_hi), y_hi)));
  return lowest <= logf(255.0f * opacity) + 0.01f;
}

__global__ void fill_unused(int32_t* __restrict__ tile_out, int32_t* __restrict__ rank_out, int64_t total,
                            int n_tiles) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    tile_out[k] = n_tiles;
    rank_out[k] = 0;
  }
}

// One block per (256 depth ranks, camera). The block's ranks own one contiguous run of slots (ends[c, r] is one past
// rank r's last slot); its threads take the run's slots in turn, each finding its rank by binary search over the
// block's ends in shared memory, so a Gaussian covering hundreds of tiles is spread over the whole block instead of
// serialising one thread (and its warp). rects[c, g] = (x0, y0, width, count) of Gaussian g's tile rectangle.
__global__ void __launch_bounds__(kExpandThreads) expand_pairs(
    const int32_t* __restrict__ order, const int32_t* __restrict__ ends, const int4* __restrict__ rects,
    const float4* __restrict__ footprint, int32_t* __restrict__ tile_out, int32_t* __restrict__ rank_out,
    int num_gauss, int64_t capacity, int tiles_x, int n_tiles) {
  __shared__ int32_t block_ends[kExpandThreads];
  const int64_t cam = blockIdx.y, row = cam * num_gauss;
  const int first_rank = blockIdx.x * kExpandThreads;
  const int ranks = min(kExpandThreads, num_gauss - first_rank);
  if (threadIdx.x < ranks) block_ends[threadIdx.x] = ends[row + first_rank + threadIdx.x];
  __syncthreads();
  const int64_t begin = first_rank == 0 ? 0 : ends[row + first_rank - 1];
  const int64_t stop = min(static_cast<int64_t>(block_ends[ranks - 1]), capacity);
  for (int64_t slot = begin + threadIdx.x; slot < stop; slot += kExpandThreads) {
    int lo = 0, hi = ranks - 1;  // the first of the block's ranks whose run ends after this slot
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (block_ends[mid] > slot) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    const int gid = order[row + first_rank + lo];
    const int4 rect = rects[row + gid];
    const int local = static_cast<int>(slot - (lo == 0 ? begin : block_ends[lo - 1]));
    const int tx = rect.x + local % rect.z, ty = rect.y + local / rect.z;
    const float4 a = footprint[2 * (row + gid)], b = footprint[2 * (row + gid) + 1];  // mx my a b | c opacity - -
    tile_out[cam * capacity + slot] = tile_hits(tx, ty, a.x, a.y, a.z, a.w, b.x, b.y) ? ty * tiles_x + tx : n_tiles;
    rank_out[cam * capacity + slot] = first_rank + lo;
  }
}

ffi::Error Expand(cudaStream_t stream, ffi::Buffer<ffi::S32> order, ffi::Buffer<ffi::S32> ends,
                  ffi::Buffer<ffi::S32> rects, ffi::Buffer<ffi::F32> footprint, ffi::ResultBuffer<ffi::S32> tile,
                  ffi::ResultBuffer<ffi::S32> rank, int32_t tiles_x, int32_t n_tiles) {
  const auto dims = order.dimensions();
  const int64_t cams = leading(dims, 1);
  const int64_t num_gauss = dims.size() ? dims.back() : 0, capacity = tile->dimensions().back();
  if (cams < 0 || ends.element_count() != order.element_count() ||
      rects.element_count() != 4 * order.element_count() || footprint.element_count() != 8 * order.element_count() ||
      leading(tile->dimensions(), 1) != cams) {
    return ffi::Error::InvalidArgument(
        "uhap expand: want order, ends [..., N], rects [..., N, 4], footprint [..., N, 8], outputs [..., P]");
  }
  if (auto err = check_cameras("uhap expand", cams); !err.success()) return err;
  if (cams * capacity == 0) return ffi::Error::Success();
  fill_unused<<<1024, 256, 0, stream>>>(tile->typed_data(), rank->typed_data(), cams * capacity, n_tiles);
  if (num_gauss > 0) {
    const dim3 grid((num_gauss + kExpandThreads - 1) / kExpandThreads, cams);
    expand_pairs<<<grid, kExpandThreads, 0, stream>>>(
        order.typed_data(), ends.typed_data(), reinterpret_cast<const int4*>(rects.typed_data()),
        reinterpret_cast<const float4*>(footprint.typed_data()), tile->typed_data(), rank->typed_data(),
        static_cast<int>(num_gauss), capacity, tiles_x, n_tiles);
  }
  return launched();
}

// Shapes shared by the compositor's calls: records [..., P, 10], tile ranges [..., T] with the same cameras.
ffi::Error composite_shapes(const char* what, const ffi::Buffer<ffi::F32>& records,
                            const ffi::Buffer<ffi::S32>& tile_start, const ffi::Buffer<ffi::S32>& tile_end,
                            int64_t* cams, int64_t* slots, int64_t* n_tiles) {
  const auto rec = records.dimensions();
  const auto tiles = tile_start.dimensions();
  *cams = leading(rec, 2);
  if (*cams < 0 || rec.back() != kFields || leading(tiles, 1) != *cams ||
      tile_end.element_count() != tile_start.element_count()) {
    return ffi::Error::InvalidArgument(std::string(what) + ": want records [..., P, 10], tile ranges [..., T]");
  }
  *slots = rec[rec.size() - 2];
  *n_tiles = tiles.back();
  if (*n_tiles > INT32_MAX) return ffi::Error::InvalidArgument(std::string(what) + ": too many tiles");
  return check_cameras(what, *cams);
}

ffi::Error Forward(cudaStream_t stream, ffi::Buffer<ffi::F32> records, ffi::Buffer<ffi::S32> tile_start,
                   ffi::Buffer<ffi::S32> tile_end, ffi::Buffer<ffi::F32> background, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> trans, ffi::ResultBuffer<ffi::S32> last, int32_t tiles_x) {
  int64_t cams, slots, n_tiles;
  if (auto err = composite_shapes("uhap composite forward", records, tile_start, tile_end, &cams, &slots, &n_tiles);
      !err.success()) {
    return err;
  }
  if (background.element_count() != 4 * static_cast<size_t>(cams)) {
    return ffi::Error::InvalidArgument("uhap composite forward: want a background [..., 4] per camera");
  }
  if (cams == 0 || n_tiles == 0) return ffi::Error::Success();
  composite_forward<<<dim3(n_tiles, cams), kPixels, 0, stream>>>(
      records.typed_data(), tile_start.typed_data(), tile_end.typed_data(),
      reinterpret_cast<const float4*>(background.typed_data()), reinterpret_cast<float4*>(out->typed_data()),
      trans->typed_data(), last->typed_data(), static_cast<int>(n_tiles), tiles_x, slots);
  return launched();
}

ffi::Error Backward(cudaStream_t stream, ffi::Buffer<ffi::F32> records, ffi::Buffer<ffi::S32> tile_start,
                    ffi::Buffer<ffi::S32> tile_end, ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> trans,
                    ffi::Buffer<ffi::S32> last, ffi::Buffer<ffi::F32> g_out, ffi::Buffer<ffi::F32> g_trans,
                    ffi::ResultBuffer<ffi::F32> g_records, int32_t tiles_x) {
  int64_t cams, slots, n_tiles;
  if (auto err = composite_shapes("uhap composite backward", records, tile_start, tile_end, &cams, &slots, &n_tiles);
      !err.success()) {
    return err;
  }
  const size_t pixels = static_cast<size_t>(cams * n_tiles * kPixels);
  if (out.element_count() != 4 * pixels || g_out.element_count() != 4 * pixels || trans.element_count() != pixels ||
      last.element_count() != pixels || g_trans.element_count() != pixels) {
    return ffi::Error::InvalidArgument("uhap composite backward: want pixels [..., T, 256] (x4 for colours)");
  }
  if (cams == 0 || n_tiles == 0) return ffi::Error::Success();
  composite_backward<<<dim3(n_tiles, cams), kPixels, 0, stream>>>(
      records.typed_data(), tile_start.typed_data(), tile_end.typed_data(),
      reinterpret_cast<const float4*>(out.typed_data()), trans.typed_data(), last.typed_data(),
      reinterpret_cast<const float4*>(g_out.typed_data()), g_trans.typed_data(), g_records->typed_data(),
      static_cast<int>(n_tiles), tiles_x, slots);
  return launched();
}

}  // namespace

// C below stands for all leading (camera) dimensions.
XLA_FFI_DEFINE_HANDLER_SYMBOL(UhapExpandPairs, Expand,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()  // order [C, N]: depth rank -> Gaussian
                                  .Arg<ffi::Buffer<ffi::S32>>()  // ends [C, N]: one past each rank's slots
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rects [C, N, 4]: x0, y0, width, count
                                  .Arg<ffi::Buffer<ffi::F32>>()  // footprint [C, N, 8]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // tile [C, P] (n_tiles: no pair)
                                  .Ret<ffi::Buffer<ffi::S32>>()  // rank [C, P]
                                  .Attr<int32_t>("tiles_x")
                                  .Attr<int32_t>("n_tiles"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(UhapCompositeForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // records [C, P, 10]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // tile_start [C, T]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // tile_end [C, T]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // background [C, 4]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [C, T, 256, 4]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // final T [C, T, 256]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // last contributing slot [C, T, 256]
                                  .Attr<int32_t>("tiles_x"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(UhapCompositeBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // records [C, P, 10]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // tile_start [C, T]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // tile_end [C, T]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out [C, T, 256, 4]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // final T [C, T, 256]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // last [C, T, 256]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g_out [C, T, 256, 4]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g_trans [C, T, 256]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // g_records [C, P, 10] (tile ranges only)
                                  .Attr<int32_t>("tiles_x"));
