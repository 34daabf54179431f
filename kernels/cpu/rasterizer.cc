// The rasterizer's CPU kernels behind XLA's FFI (built at first use by kernels/cpu_ops.py with g++; the thresholds
// come from kernels/constants.py as -D defines).
//
// Step 2, binning: depth ranking (a radix sort), pair expansion (dropping the tiles no pixel can take) and the sort of
// pairs by tile (a counting sort), per camera: the same slots as kernels/binning.bin_pairs, where XLA's CPU sorts
// (comparison sorts) cost more than the compositor.
//
// Steps 3-4, compositing: the same pair records, tile ranges, outputs and per-pixel arithmetic as the CUDA kernels.
// One task per (camera, tile), pair-major inside the tile: each pair visits only the pixels its ellipse can reach
// (rows, then a column span per row, from the conic), so a small Gaussian costs a few dozen pixels, not 256. Tasks
// are spread over XLA's intra-op thread pool; a tile's pixels and its pairs' gradient slots belong to its task
// alone, so there are no races and no atomics, and the results do not depend on the thread count.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kTile = 16;
constexpr int kPixels = kTile * kTile;
constexpr int kFields = 10;  // mean x, y; conic xx, xy, yy; opacity; r, g, b, depth
constexpr int kFeatures = 4;
constexpr float kAlphaMin = UHAP_ALPHA_MIN;
constexpr float kAlphaMax = UHAP_ALPHA_MAX;
constexpr float kTransEpsilon = UHAP_T_EPSILON;
// Slack of the reach test in sigma (and one pixel on each side): pixels outside are far below ALPHA_MIN, so the
// test only saves work and never changes a pixel.
constexpr double kSigmaMargin = 0.05;

// Runs body(0..n-1) on the calling thread and up to pool.num_threads() - 1 helpers; each index runs exactly once.
// Helpers that start after the work is gone return at once without touching it, so the caller only waits for the
// ones that took an index (the pool may be busy, or have a single thread: then the caller does everything).
struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int> active{0};
  std::mutex mutex;
  std::condition_variable idle;
  int64_t count = 0;
  std::function<void(int64_t)> body;
};

void drain(Shared& s) {
  for (int64_t i = s.next.fetch_add(1); i < s.count; i = s.next.fetch_add(1)) s.body(i);
}

void parallel_for(ffi::ThreadPool& pool, int64_t count, std::function<void(int64_t)> body) {
  if (count <= 0) return;
  auto shared = std::make_shared<Shared>();
  shared->count = count;
  shared->body = std::move(body);
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, count - 1);
  for (int64_t k = 0; k < helpers; ++k) {
    pool.Schedule([shared] {
      shared->active.fetch_add(1);
      drain(*shared);
      if (shared->active.fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> lock(shared->mutex);
        shared->idle.notify_all();
      }
    });
  }
  drain(*shared);
  std::unique_lock<std::mutex> lock(shared->mutex);
  shared->idle.wait(lock, [&] { return shared->active.load() == 0; });
}

// The pixels of a tile a pair may reach: rows [row0, row1), and in row r the columns [col0[r], col1[r]).
struct Reach {
  int row0 = 0, row1 = 0;
  int col0[kTile], col1[kTile];
};

// Bounds the pixels where alpha = opacity exp(-sigma) >= ALPHA_MIN, i.e. sigma <= ln(opacity / ALPHA_MIN), from the
// conic's ellipse (in double, with the margin above). A conic that is not positive definite (never from the
// projection) gets the whole tile. Returns false when no pixel can take the pair.
bool reach(const float* rec, float x_first, float y_first, Reach* out) {
  const float opacity = rec[5];
  if (!(opacity >= kAlphaMin)) return false;  // alpha <= opacity everywhere (also NaN and empty slots)
  const double mx = rec[0], my = rec[1], a = rec[2], b = rec[3], c = rec[4];
  const double limit = std::log(static_cast<double>(opacity) / kAlphaMin) + kSigmaMargin;
  const double det = a * c - b * b;
  if (!(a > 0.0 && c > 0.0 && det > 0.0) || !std::isfinite(mx) || !std::isfinite(my) || !std::isfinite(det)) {
    out->row0 = 0;
    out->row1 = kTile;
    for (int r = 0; r < kTile; ++r) out->col0[r] = 0, out->col1[r] = kTile;
    return true;
  }
  // min over dx of sigma = det / (2a) dy^2; sigma's roots in dx solve a dx^2 + 2b dy dx + c dy^2 - 2 limit = 0.
  const double reach_y = std::sqrt(2.0 * limit * a / det);
  const double lo = std::clamp(my - reach_y - y_first, -2.0, kTile + 2.0);
  const double hi = std::clamp(my + reach_y - y_first, -2.0, kTile + 2.0);
  const int row0 = std::max(0, static_cast<int>(std::floor(lo)) - 1);
  const int row1 = std::min(kTile, static_cast<int>(std::floor(hi)) + 2);
  bool any = false;
  for (int r = row0; r < row1; ++r) {
    const double dy = my - (y_first + r);
    const double disc = 2.0 * a * limit - det * dy * dy;
    out->col0[r] = out->col1[r] = 0;
    if (disc < 0.0) continue;
    const double root = std::sqrt(disc);
    // dx = mx - px in [(-b dy - root) / a, (-b dy + root) / a]
    const double px_lo = std::clamp(mx - (-b * dy + root) / a - x_first, -2.0, kTile + 2.0);
    const double px_hi = std::clamp(mx - (-b * dy - root) / a - x_first, -2.0, kTile + 2.0);
    out->col0[r] = std::max(0, static_cast<int>(std::floor(px_lo)) - 1);
    out->col1[r] = std::min(kTile, static_cast<int>(std::floor(px_hi)) + 2);
    any |= out->col0[r] < out->col1[r];
  }
  out->row0 = row0;
  out->row1 = row1;
  return any;
}

// One pixel against one pair, as the reference: sigma, exp(-sigma), opacity exp(-sigma) and alpha (clamped).
struct Eval {
  float dx, dy, sigma, vis, raw, alpha;
  bool live;
};

inline Eval evaluate(const float* rec, float px, float py) {
  Eval e;
  e.dx = rec[0] - px;
  e.dy = rec[1] - py;
  e.sigma = 0.5f * (rec[2] * e.dx * e.dx + rec[4] * e.dy * e.dy) + rec[3] * e.dx * e.dy;
  e.vis = std::exp(-e.sigma);
  e.raw = rec[5] * e.vis;
  e.alpha = std::min(e.raw, kAlphaMax);
  e.live = e.sigma >= 0.0f && e.alpha >= kAlphaMin;  // NaN: not live
  return e;
}

struct Problem {
  int64_t cams, slots, n_tiles;
  int tiles_x;
};

// Front to back over the tile's pairs; a pixel stops (exclusively) once T would drop to T_EPSILON, the tile once
// all its pixels have.
void forward_tile(const Problem& p, int64_t task, const float* records, const int32_t* tile_start,
                  const int32_t* tile_end, const float* background, float* out, float* trans_out,
                  int32_t* last_out) {
  const int64_t cam = task / p.n_tiles, tile = task % p.n_tiles;
  const float* rec = records + cam * p.slots * kFields;
  const float x_first = static_cast<float>((tile % p.tiles_x) * kTile) + 0.5f;
  const float y_first = static_cast<float>((tile / p.tiles_x) * kTile) + 0.5f;
  float trans[kPixels], acc[kPixels][kFeatures];
  int32_t last[kPixels];
  bool done[kPixels];
  std::fill_n(trans, kPixels, 1.0f);
  std::fill_n(&acc[0][0], kPixels * kFeatures, 0.0f);
  std::fill_n(last, kPixels, -1);
  std::fill_n(done, kPixels, false);
  int finished = 0;
  const int start = std::max(tile_start[task], 0);
  const int end = std::min<int64_t>(tile_end[task], p.slots);
  Reach span;
  for (int j = start; j < end && finished < kPixels; ++j) {
    const float* r = rec + static_cast<int64_t>(j) * kFields;
    if (!reach(r, x_first, y_first, &span)) continue;
    for (int row = span.row0; row < span.row1; ++row) {
      const float py = y_first + static_cast<float>(row);
      for (int col = span.col0[row]; col < span.col1[row]; ++col) {
        const int k = row * kTile + col;
        if (done[k]) continue;
        const Eval e = evaluate(r, x_first + static_cast<float>(col), py);
        if (!e.live) continue;
        const float next = trans[k] * (1.0f - e.alpha);
        if (next <= kTransEpsilon) {
          done[k] = true;
          ++finished;
          continue;
        }
        const float weight = e.alpha * trans[k];
        for (int f = 0; f < kFeatures; ++f) acc[k][f] += weight * r[6 + f];
        trans[k] = next;
        last[k] = j;
      }
    }
  }
  const float* bg = background + cam * kFeatures;
  for (int k = 0; k < kPixels; ++k) {
    const int64_t pixel = task * kPixels + k;
    for (int f = 0; f < kFeatures; ++f) out[pixel * kFeatures + f] = acc[k][f] + trans[k] * bg[f];
    trans_out[pixel] = trans[k];
    last_out[pixel] = last[k];
  }
}

// Recomputes T front to back as the forward did; the gradient-weighted colour behind pair i is (G - prefix_i), with
// G the output's gradient-weighted sum, so there is no reverse pass. Each pair's ten gradients are summed over the
// tile's pixels (in double) and written to the pair's own slot.
void backward_tile(const Problem& p, int64_t task, const float* records, const int32_t* tile_start,
                   const int32_t* tile_end, const float* out, const float* trans_final, const int32_t* last_in,
                   const float* g_out, const float* g_trans, float* g_records) {
  const int64_t cam = task / p.n_tiles, tile = task % p.n_tiles;
  const float* rec = records + cam * p.slots * kFields;
  float* g_rec = g_records + cam * p.slots * kFields;
  const float x_first = static_cast<float>((tile % p.tiles_x) * kTile) + 0.5f;
  const float y_first = static_cast<float>((tile / p.tiles_x) * kTile) + 0.5f;
  const int start = std::max(tile_start[task], 0);
  const int end = std::min<int64_t>(tile_end[task], p.slots);
  float trans[kPixels], rest[kPixels], g[kPixels][kFeatures];
  int32_t last[kPixels];
  int stop = start;  // pairs [start, stop) may have a taker; the rest keep their zeros
  for (int k = 0; k < kPixels; ++k) {
    const int64_t pixel = task * kPixels + k;
    trans[k] = 1.0f;
    last[k] = last_in[pixel];
    stop = std::max(stop, last[k] + 1);
    float total = g_trans[pixel] * trans_final[pixel];
    for (int f = 0; f < kFeatures; ++f) {
      g[k][f] = g_out[pixel * kFeatures + f];
      total += g[k][f] * out[pixel * kFeatures + f];
    }
    rest[k] = total;
  }
  stop = std::min(stop, end);
  Reach span;
  for (int j = start; j < stop; ++j) {
    const float* r = rec + static_cast<int64_t>(j) * kFields;
    if (!reach(r, x_first, y_first, &span)) continue;
    double v[kFields] = {};
    for (int row = span.row0; row < span.row1; ++row) {
      const float py = y_first + static_cast<float>(row);
      for (int col = span.col0[row]; col < span.col1[row]; ++col) {
        const int k = row * kTile + col;
        if (j > last[k]) continue;
        const Eval e = evaluate(r, x_first + static_cast<float>(col), py);
        if (!e.live) continue;
        const float weight = e.alpha * trans[k];
        float g_feat = 0.0f;
        for (int f = 0; f < kFeatures; ++f) g_feat += g[k][f] * r[6 + f];
        rest[k] -= weight * g_feat;  // now the gradient-weighted colour behind this pair
        const float keep = 1.0f - e.alpha;
        const float g_alpha = trans[k] * g_feat - rest[k] / keep;
        const bool unclamped = e.raw <= kAlphaMax;
        const float g_sigma = unclamped ? -e.raw * g_alpha : 0.0f;
        v[0] += g_sigma * (r[2] * e.dx + r[3] * e.dy);
        v[1] += g_sigma * (r[3] * e.dx + r[4] * e.dy);
        v[2] += 0.5f * g_sigma * e.dx * e.dx;
        v[3] += g_sigma * e.dx * e.dy;
        v[4] += 0.5f * g_sigma * e.dy * e.dy;
        v[5] += unclamped ? e.vis * g_alpha : 0.0f;
        for (int f = 0; f < kFeatures; ++f) v[6 + f] += weight * g[k][f];
        trans[k] *= keep;
      }
    }
    for (int f = 0; f < kFields; ++f) g_rec[static_cast<int64_t>(j) * kFields + f] = static_cast<float>(v[f]);
  }
}

// Whether any pixel centre of the tile can reach alpha >= 1/255, as kernels/binning.tile_hits (same margin).
bool tile_hits(int tx, int ty, float mx, float my, float a, float b, float c, float opacity) {
  const float x_lo = static_cast<float>(tx * kTile) + 0.5f - mx, y_lo = static_cast<float>(ty * kTile) + 0.5f - my;
  const float x_hi = x_lo + (kTile - 1), y_hi = y_lo + (kTile - 1);
  const float bound = std::log(255.0f * opacity) + 0.01f;
  if (x_lo <= 0.0f && x_hi >= 0.0f && y_lo <= 0.0f && y_hi >= 0.0f) return 0.0f <= bound;
  auto sigma = [&](float dx, float dy) { return 0.5f * (a * dx * dx + c * dy * dy) + b * dx * dy; };
  auto clip = [](float v, float lo, float hi) { return std::min(std::max(v, lo), hi); };
  const float lowest = std::min(std::min(sigma(x_lo, clip(-b * x_lo / c, y_lo, y_hi)),
                                         sigma(x_hi, clip(-b * x_hi / c, y_lo, y_hi))),
                                std::min(sigma(clip(-b * y_lo / a, x_lo, x_hi), y_lo),
                                         sigma(clip(-b * y_hi / a, x_lo, x_hi), y_hi)));
  return lowest <= bound;
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

// Stable LSD radix sort of the Gaussians' depth keys (8-bit digits; a digit all keys share is skipped):
// rank -> Gaussian id, ties in index order, as binning.rank_by_depth.
void rank_by_depth(const uint32_t* keys, int64_t n, std::vector<int32_t>& order, std::vector<int32_t>& scratch) {
  order.resize(n);
  scratch.resize(n);
  for (int64_t i = 0; i < n; ++i) order[i] = static_cast<int32_t>(i);
  for (int shift = 0; shift < 32; shift += 8) {
    int64_t counts[257] = {};
    for (int64_t i = 0; i < n; ++i) ++counts[((keys[i] >> shift) & 0xff) + 1];
    if (std::any_of(counts + 1, counts + 257, [n](int64_t c) { return c == n; })) continue;
    for (int d = 0; d < 256; ++d) counts[d + 1] += counts[d];
    for (int64_t i = 0; i < n; ++i) scratch[counts[(keys[order[i]] >> shift) & 0xff]++] = order[i];
    order.swap(scratch);
  }
}

// Step 2 for one camera: rank by depth, emit the first `capacity` pairs in rank order (a pair whose tile no pixel
// can take holds no slot, as binning.expand_pairs + tile_hits), and place them per tile with a counting sort, which
// keeps depth order within each tile: the same slots as binning.bin_pairs with its sorts.
void bin_camera(const uint32_t* keys, const int32_t* rects, const float* foot, int64_t num_gauss, int64_t capacity,
                int tiles_x, int n_tiles, int32_t* tile_out, int32_t* gid_out, int32_t* bounds) {
  std::vector<int32_t> order, scratch;
  rank_by_depth(keys, num_gauss, order, scratch);
  std::vector<int32_t> pair_tile, pair_gid;
  pair_tile.reserve(capacity);
  pair_gid.reserve(capacity);
  int64_t slot = 0;
  for (int64_t r = 0; r < num_gauss && slot < capacity; ++r) {
    const int32_t gid = order[r];
    const int32_t* rect = rects + 4 * static_cast<int64_t>(gid);  // x0, y0, width, count
    const float* f = foot + 8 * static_cast<int64_t>(gid);          // mx, my, a, b, c, opacity, -, -
    for (int local = 0; local < rect[3] && slot < capacity; ++local, ++slot) {
      const int tx = rect[0] + local % rect[2], ty = rect[1] + local / rect[2];
      if (!tile_hits(tx, ty, f[0], f[1], f[2], f[3], f[4], f[5])) continue;
      pair_tile.push_back(ty * tiles_x + tx);
      pair_gid.push_back(gid);
    }
  }
  std::fill(bounds, bounds + n_tiles + 1, 0);
  for (const int32_t t : pair_tile) ++bounds[t + 1];
  for (int t = 0; t < n_tiles; ++t) bounds[t + 1] += bounds[t];
  std::vector<int32_t> next(bounds, bounds + n_tiles);
  for (size_t k = 0; k < pair_tile.size(); ++k) {
    const int32_t at = next[pair_tile[k]]++;
    tile_out[at] = pair_tile[k];
    gid_out[at] = pair_gid[k];
  }
  std::fill(tile_out + pair_tile.size(), tile_out + capacity, n_tiles);
  std::fill(gid_out + pair_tile.size(), gid_out + capacity, 0);
}

ffi::Error Bin(ffi::ThreadPool pool, ffi::Buffer<ffi::U32> keys, ffi::Buffer<ffi::S32> rects,
               ffi::Buffer<ffi::F32> footprint, ffi::ResultBuffer<ffi::S32> tile, ffi::ResultBuffer<ffi::S32> gid,
               ffi::ResultBuffer<ffi::S32> bounds, int32_t tiles_x, int32_t n_tiles) {
  const auto dims = keys.dimensions();
  const int64_t cams = leading(dims, 1);
  const int64_t num_gauss = dims.size() ? dims.back() : 0, capacity = tile->dimensions().back();
  if (cams < 0 || rects.element_count() != 4 * keys.element_count() ||
      footprint.element_count() != 8 * keys.element_count() || leading(tile->dimensions(), 1) != cams ||
      gid->element_count() != tile->element_count() || bounds->dimensions().back() != n_tiles + 1 ||
      leading(bounds->dimensions(), 1) != cams || tiles_x <= 0 || n_tiles <= 0) {
    return ffi::Error::InvalidArgument(
        "uhap bin: want keys [..., N], rects [..., N, 4], footprint [..., N, 8], outputs [..., P] and [..., T + 1]");
  }
  const uint32_t* keys_p = keys.typed_data();
  const int32_t* rects_p = rects.typed_data();
  const float* foot_p = footprint.typed_data();
  int32_t *tile_p = tile->typed_data(), *gid_p = gid->typed_data(), *bounds_p = bounds->typed_data();
  parallel_for(pool, cams, [&](int64_t cam) {
    bin_camera(keys_p + cam * num_gauss, rects_p + 4 * cam * num_gauss, foot_p + 8 * cam * num_gauss, num_gauss,
               capacity, tiles_x, n_tiles, tile_p + cam * capacity, gid_p + cam * capacity,
               bounds_p + cam * (n_tiles + 1));
  });
  return ffi::Error::Success();
}

// Shapes shared by the compositor's calls: records [..., P, 10], tile ranges [..., T] with the same cameras.
ffi::Error composite_shapes(const char* what, const ffi::Buffer<ffi::F32>& records,
                            const ffi::Buffer<ffi::S32>& tile_start, const ffi::Buffer<ffi::S32>& tile_end,
                            int32_t tiles_x, Problem* p) {
  const auto rec = records.dimensions();
  const auto tiles = tile_start.dimensions();
  p->cams = leading(rec, 2);
  if (p->cams < 0 || rec.back() != kFields || leading(tiles, 1) != p->cams ||
      tile_end.element_count() != tile_start.element_count() || tiles_x <= 0) {
    return ffi::Error::InvalidArgument(std::string(what) + ": want records [..., P, 10], tile ranges [..., T]");
  }
  p->slots = rec[rec.size() - 2];
  p->n_tiles = tiles.back();
  p->tiles_x = tiles_x;
  if (p->slots > INT32_MAX) return ffi::Error::InvalidArgument(std::string(what) + ": too many pair slots");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> records, ffi::Buffer<ffi::S32> tile_start,
                   ffi::Buffer<ffi::S32> tile_end, ffi::Buffer<ffi::F32> background, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> trans, ffi::ResultBuffer<ffi::S32> last, int32_t tiles_x) {
  Problem p;
  if (auto err = composite_shapes("uhap composite forward", records, tile_start, tile_end, tiles_x, &p);
      !err.success()) {
    return err;
  }
  if (background.element_count() != static_cast<size_t>(kFeatures * p.cams)) {
    return ffi::Error::InvalidArgument("uhap composite forward: want a background [..., 4] per camera");
  }
  const float* rec = records.typed_data();
  const int32_t *start = tile_start.typed_data(), *end = tile_end.typed_data();
  const float* bg = background.typed_data();
  float *out_p = out->typed_data(), *trans_p = trans->typed_data();
  int32_t* last_p = last->typed_data();
  parallel_for(pool, p.cams * p.n_tiles, [&](int64_t task) {
    forward_tile(p, task, rec, start, end, bg, out_p, trans_p, last_p);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> records, ffi::Buffer<ffi::S32> tile_start,
                    ffi::Buffer<ffi::S32> tile_end, ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> trans,
                    ffi::Buffer<ffi::S32> last, ffi::Buffer<ffi::F32> g_out, ffi::Buffer<ffi::F32> g_trans,
                    ffi::ResultBuffer<ffi::F32> g_records, int32_t tiles_x) {
  Problem p;
  if (auto err = composite_shapes("uhap composite backward", records, tile_start, tile_end, tiles_x, &p);
      !err.success()) {
    return err;
  }
  const size_t pixels = static_cast<size_t>(p.cams * p.n_tiles * kPixels);
  if (out.element_count() != kFeatures * pixels || g_out.element_count() != kFeatures * pixels ||
      trans.element_count() != pixels || last.element_count() != pixels || g_trans.element_count() != pixels) {
    return ffi::Error::InvalidArgument("uhap composite backward: want pixels [..., T, 256] (x4 for colours)");
  }
  // Slots no pixel takes (unused ones, and those behind a tile's last taker) get zeros.
  std::memset(g_records->typed_data(), 0, g_records->element_count() * sizeof(float));
  const float* rec = records.typed_data();
  const int32_t *start = tile_start.typed_data(), *end = tile_end.typed_data();
  const float *out_p = out.typed_data(), *trans_p = trans.typed_data();
  const int32_t* last_p = last.typed_data();
  const float *g_out_p = g_out.typed_data(), *g_trans_p = g_trans.typed_data();
  float* g_rec = g_records->typed_data();
  parallel_for(pool, p.cams * p.n_tiles, [&](int64_t task) {
    backward_tile(p, task, rec, start, end, out_p, trans_p, last_p, g_out_p, g_trans_p, g_rec);
  });
  return ffi::Error::Success();
}

}  // namespace

// C below stands for all leading (camera) dimensions.
XLA_FFI_DEFINE_HANDLER_SYMBOL(UhapCpuBinPairs, Bin,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U32>>()  // depth keys [C, N] (culled: the largest)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rects [C, N, 4]: x0, y0, width, count
                                  .Arg<ffi::Buffer<ffi::F32>>()  // footprint [C, N, 8]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // tile [C, P] (n_tiles: no pair), sorted
                                  .Ret<ffi::Buffer<ffi::S32>>()  // Gaussian id [C, P] (0: no pair)
                                  .Ret<ffi::Buffer<ffi::S32>>()  // tile bounds [C, T + 1]
                                  .Attr<int32_t>("tiles_x")
                                  .Attr<int32_t>("n_tiles"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(UhapCpuCompositeForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // records [C, P, 10]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // tile_start [C, T]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // tile_end [C, T]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // background [C, 4]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [C, T, 256, 4]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // final T [C, T, 256]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // last contributing slot [C, T, 256]
                                  .Attr<int32_t>("tiles_x"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(UhapCpuCompositeBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // records [C, P, 10]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // tile_start [C, T]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // tile_end [C, T]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out [C, T, 256, 4]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // final T [C, T, 256]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // last [C, T, 256]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g_out [C, T, 256, 4]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g_trans [C, T, 256]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // g_records [C, P, 10]
                                  .Attr<int32_t>("tiles_x"));
