#include "plot/plot.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <utility>

#include <gd.h>
#include <gdfontmb.h>
#include <gdfonts.h>
#include <gdfontt.h>

#include "core/error.h"

namespace spear::plot {

namespace {

// ---------------------------------------------------------------------------------------------------------
// Image, colours, text

struct ImageDeleter {
  void operator()(gdImagePtr im) const { gdImageDestroy(im); }
};
using Image = std::unique_ptr<gdImage, ImageDeleter>;

constexpr Rgb kWhite{255, 255, 255}, kText{20, 20, 20}, kFrame{90, 90, 90}, kGrid{228, 228, 228},
    kRefLine{110, 110, 110}, kMark{235, 30, 30};
// Tableau-10: distinct on white, distinguishable for most colour-vision deficiencies.
constexpr Rgb kSeries[] = {{31, 119, 180}, {255, 127, 14}, {44, 160, 44},   {214, 39, 40}, {148, 103, 189},
                           {140, 86, 75},  {227, 119, 194}, {127, 127, 127}, {188, 189, 34}, {23, 190, 207}};
constexpr int kNumSeriesColours = int(sizeof(kSeries) / sizeof(kSeries[0]));

int col(Rgb c) { return gdTrueColor(c.r, c.g, c.b); }

Image new_image(int w, int h) {
  Image im(gdImageCreateTrueColor(w, h));
  if (!im) fail("plot: cannot allocate a {}x{} image", w, h);
  gdImageFilledRectangle(im.get(), 0, 0, w - 1, h - 1, col(kWhite));
  return im;
}

gdFontPtr font_small() { return gdFontGetSmall(); }       // 6 × 13
gdFontPtr font_bold() { return gdFontGetMediumBold(); }   // 7 × 13
gdFontPtr font_tiny() { return gdFontGetTiny(); }         // 5 × 8

// The built-in fonts cover ASCII (and ISO-8859-2 above it); UTF-8 sequences would print as junk.
std::string ascii(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      out += (c >= 0x20 ? char(c) : ' ');
    } else if ((c & 0xC0) != 0x80) {
      out += '?';  // one '?' per UTF-8 code point (continuation bytes are skipped)
    }
  }
  return out;
}

int text_w(gdFontPtr f, const std::string& s) { return f->w * int(ascii(s).size()); }

void text(gdImagePtr im, gdFontPtr f, int x, int y, const std::string& s, Rgb c) {
  std::string a = ascii(s);
  gdImageString(im, f, x, y, reinterpret_cast<unsigned char*>(a.data()), col(c));
}
void text_centred(gdImagePtr im, gdFontPtr f, int cx, int y, const std::string& s, Rgb c) {
  text(im, f, cx - text_w(f, s) / 2, y, s, c);
}
// Reads bottom to top, starting at y_bottom, glyphs centred on column cx.
void text_up_from(gdImagePtr im, gdFontPtr f, int cx, int y_bottom, const std::string& s, Rgb c) {
  std::string a = ascii(s);
  gdImageStringUp(im, f, cx - f->h / 2, y_bottom, reinterpret_cast<unsigned char*>(a.data()), col(c));
}
// Reads bottom to top, centred on (cx, cy).
void text_up(gdImagePtr im, gdFontPtr f, int cx, int cy, const std::string& s, Rgb c) {
  text_up_from(im, f, cx, cy + text_w(f, s) / 2, s, c);
}

void dashed_hline(gdImagePtr im, int x0, int x1, int y, Rgb c) {
  for (int x = x0; x <= x1; x += 12) gdImageLine(im, x, y, std::min(x + 6, x1), y, col(c));
}

void save_png(gdImagePtr im, const std::string& path, const std::string& what) {
  int size = 0;
  void* data = gdImagePngPtr(im, &size);
  if (!data || size <= 0) fail("plot {}: PNG encoding failed for '{}'", what, path);
  std::unique_ptr<void, void (*)(void*)> guard(data, gdFree);
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) fail("plot {}: cannot open '{}' for writing: {}", what, path, std::strerror(errno));
  const bool wrote = std::fwrite(data, 1, size_t(size), f) == size_t(size);
  const int err = errno;
  const bool closed = std::fclose(f) == 0;
  if (!wrote || !closed) fail("plot {}: cannot write '{}': {}", what, path, std::strerror(wrote ? errno : err));
}

std::string quoted(const std::string& title) { return title.empty() ? "(untitled)" : "'" + title + "'"; }

// ---------------------------------------------------------------------------------------------------------
// Axes and ticks

// A value axis: [lo, hi] in transformed units (log10 on a log axis), mapped linearly onto [p_lo, p_hi] pixels.
struct Axis {
  double lo = 0, hi = 1;
  bool log = false;
  double p_lo = 0, p_hi = 1;

  bool usable(double v) const { return std::isfinite(v) && (!log || v > 0); }
  double tf(double v) const { return log ? std::log10(v) : v; }
  double px_t(double t) const { return p_lo + (t - lo) / (hi - lo) * (p_hi - p_lo); }
  double px(double v) const { return px_t(tf(v)); }
};

// Axis over data in [dmin, dmax] (data units, both usable), padded by pad·span on each side.
Axis make_axis(double dmin, double dmax, bool log, double pad) {
  Axis a;
  a.log = log;
  a.lo = a.tf(dmin);
  a.hi = a.tf(dmax);
  if (!(a.hi - a.lo > 1e-12 * std::max(1.0, std::abs(a.hi)))) {
    const double d = log ? 0.5 : (a.lo != 0 ? 0.1 * std::abs(a.lo) : 0.5);
    a.lo -= d;
    a.hi += d;
  }
  const double span = a.hi - a.lo;
  a.lo -= pad * span;
  a.hi += pad * span;
  return a;
}

// Round steps 1, 2, 5 × 10^k, about `target` of them across [lo, hi].
std::vector<double> linear_ticks(double lo, double hi, int target) {
  const double raw = (hi - lo) / std::max(1, target);
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  const double f = raw / mag;
  const double step = (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * mag;
  std::vector<double> t;
  for (double k = std::ceil(lo / step - 1e-9); k * step <= hi + 1e-9 * step; k += 1) {
    const double v = k * step;
    t.push_back(std::abs(v) < 1e-9 * step ? 0.0 : v);
  }
  return t;
}

// Tick values in data units.
std::vector<double> axis_ticks(const Axis& a, int target) {
  if (!a.log) return linear_ticks(a.lo, a.hi, target);
  if (a.hi - a.lo < 1.0) return linear_ticks(std::pow(10.0, a.lo), std::pow(10.0, a.hi), target);
  std::vector<double> t;
  const int k0 = int(std::ceil(a.lo - 1e-9)), k1 = int(std::floor(a.hi + 1e-9));
  const int step = std::max(1, int(std::ceil(double(k1 - k0 + 1) / target)));
  for (int k = k0; k <= k1; k += step) t.push_back(std::pow(10.0, k));
  if (a.hi - a.lo <= 3.0)  // few decades: 2 and 5 as well
    for (int k = int(std::floor(a.lo)); k <= k1; ++k)
      for (double m : {2.0, 5.0}) {
        const double v = m * std::pow(10.0, k);
        if (a.tf(v) >= a.lo && a.tf(v) <= a.hi) t.push_back(v);
      }
  std::sort(t.begin(), t.end());
  return t;
}

std::string tick_label(double v) { return fmt::format("{:g}", v); }

struct Frame {
  int x0, y0, x1, y1;  // plot area: left, top, right, bottom (inclusive)
};

// Frame with room for the y tick labels, then both axes mapped onto it.
Frame place_frame(int width, int height, const std::vector<double>& yticks, Axis& ax, Axis& ay) {
  int label_w = 0;
  for (double v : yticks) label_w = std::max(label_w, text_w(font_small(), tick_label(v)));
  Frame f{22 + label_w + 8, 34, width - 22, height - 48};
  ax.p_lo = f.x0, ax.p_hi = f.x1;
  ay.p_lo = f.y1, ay.p_hi = f.y0;
  return f;
}

void draw_axes(gdImagePtr im, const Frame& f, const Axis& ax, const Axis& ay, const std::vector<double>& xticks,
               const std::vector<double>& yticks, const std::string& title, const std::string& xlabel,
               const std::string& ylabel) {
  gdFontPtr fs = font_small();
  for (double v : xticks) {
    const int x = int(std::lround(ax.px(v)));
    gdImageLine(im, x, f.y0, x, f.y1, col(kGrid));
    gdImageLine(im, x, f.y1, x, f.y1 + 4, col(kFrame));
    text_centred(im, fs, x, f.y1 + 6, tick_label(v), kText);
  }
  for (double v : yticks) {
    const int y = int(std::lround(ay.px(v)));
    gdImageLine(im, f.x0, y, f.x1, y, col(kGrid));
    gdImageLine(im, f.x0 - 4, y, f.x0, y, col(kFrame));
    const std::string s = tick_label(v);
    text(im, fs, f.x0 - 6 - text_w(fs, s), y - fs->h / 2, s, kText);
  }
  gdImageRectangle(im, f.x0, f.y0, f.x1, f.y1, col(kFrame));
  if (!title.empty()) text_centred(im, font_bold(), (f.x0 + f.x1) / 2, 10, title, kText);
  if (!xlabel.empty()) text_centred(im, fs, (f.x0 + f.x1) / 2, f.y1 + 24, xlabel, kText);
  if (!ylabel.empty()) text_up(im, fs, 12, (f.y0 + f.y1) / 2, ylabel, kText);
}

// Top-right inside the frame; as many entries as fit.
void draw_legend(gdImagePtr im, const Frame& f, const std::vector<std::pair<std::string, Rgb>>& entries) {
  if (entries.empty()) return;
  gdFontPtr fs = font_small();
  const int row_h = fs->h + 3;
  const int max_rows = std::max(1, (f.y1 - f.y0 - 20) / row_h);
  const int n = std::min<int>(int(entries.size()), max_rows);
  int w = 0;
  for (int i = 0; i < n; ++i) w = std::max(w, text_w(fs, entries[size_t(i)].first));
  w = std::min(w, (f.x1 - f.x0) / 2);
  const int bw = 8 + 22 + 6 + w + 8, bh = 6 + n * row_h + 4;
  const int bx = f.x1 - 10 - bw, by = f.y0 + 10;
  gdImageFilledRectangle(im, bx, by, bx + bw, by + bh, col(kWhite));
  gdImageRectangle(im, bx, by, bx + bw, by + bh, col(kFrame));
  gdImageSetClip(im, bx, by, bx + bw - 4, by + bh);
  for (int i = 0; i < n; ++i) {
    const int y = by + 6 + i * row_h;
    const bool more = i == max_rows - 1 && int(entries.size()) > max_rows;
    const auto& [name, c] = entries[size_t(i)];
    gdImageSetThickness(im, 2);
    if (!more) gdImageLine(im, bx + 8, y + fs->h / 2, bx + 30, y + fs->h / 2, col(c));
    gdImageSetThickness(im, 1);
    text(im, fs, bx + 36, y, more ? fmt::format("... {} more", entries.size() - size_t(i)) : name, kText);
  }
  gdImageSetClip(im, 0, 0, gdImageSX(im) - 1, gdImageSY(im) - 1);
}

// ---------------------------------------------------------------------------------------------------------
// Heat map

struct HeatMapGeometry {
  HeatMapLayout l;
  int rows = 0, cols = 0;
  double lo = 0, hi = 1;  // colour range, transformed units
  std::vector<double> ticks;
  bool vertical_col_labels = false;
  int bar_x = 0, bar_h = 0, col_label_h = 0;
  bool any_marked = false;
};

bool heat_usable(const HeatMap& h, double v) { return std::isfinite(v) && (!h.log_scale || v > 0); }
double heat_tf(const HeatMap& h, double v) { return h.log_scale ? std::log10(v) : v; }

HeatMapGeometry heatmap_geometry(const HeatMap& h) {
  HeatMapGeometry g;
  g.rows = int(h.row_labels.size());
  g.cols = int(h.col_labels.size());
  const std::string what = "heat map " + quoted(h.title);
  if (g.rows == 0 || g.cols == 0)
    fail("{}: no data ({} row labels x {} column labels)", what, g.rows, g.cols);
  const size_t n = size_t(g.rows) * size_t(g.cols);
  if (h.values.size() != n)
    fail("{}: {} values for {} rows x {} columns", what, h.values.size(), g.rows, g.cols);
  if (!h.marked.empty() && h.marked.size() != n) fail("{}: marked has {} entries, want {}", what, h.marked.size(), n);
  if (!h.cell_text.empty() && h.cell_text.size() != n)
    fail("{}: cell_text has {} entries, want {}", what, h.cell_text.size(), n);
  double vmin = INFINITY, vmax = -INFINITY;
  for (double v : h.values)
    if (heat_usable(h, v)) vmin = std::min(vmin, v), vmax = std::max(vmax, v);
  if (!(vmin <= vmax))
    fail("{}: no {} values to colour", what, h.log_scale ? "finite positive (log scale)" : "finite");
  for (uint8_t m : h.marked) g.any_marked = g.any_marked || m;

  Axis a = make_axis(vmin, vmax, h.log_scale, 0.0);
  g.lo = a.lo, g.hi = a.hi;
  g.ticks = axis_ticks(a, 6);

  gdFontPtr fs = font_small();
  HeatMapLayout& l = g.l;
  l.cell_w = std::clamp(720 / g.cols, 12, 64);
  l.cell_h = std::clamp(480 / g.rows, 12, 40);
  int row_label_w = 0, col_label_w = 0, tick_w = 0;
  for (const auto& s : h.row_labels) row_label_w = std::max(row_label_w, text_w(fs, s));
  for (const auto& s : h.col_labels) col_label_w = std::max(col_label_w, text_w(fs, s));
  for (double v : g.ticks) tick_w = std::max(tick_w, text_w(fs, tick_label(v)));
  l.grid_x = 10 + row_label_w + 6;
  l.grid_y = 34;
  const int grid_w = g.cols * l.cell_w, grid_h = g.rows * l.cell_h;
  g.vertical_col_labels = col_label_w > l.cell_w - 2;
  g.col_label_h = g.vertical_col_labels ? col_label_w + 10 : fs->h + 8;
  g.bar_x = l.grid_x + grid_w + 22;
  g.bar_h = std::max(grid_h, 160);
  const int right = g.bar_x + 18 + 6 + tick_w + 10 + (h.colorbar_label.empty() ? 0 : fs->h + 10);
  l.width = std::max({right, text_w(font_bold(), h.title) + 20, 240});
  l.height = l.grid_y + std::max(grid_h + g.col_label_h, g.bar_h + 8) + (g.any_marked ? fs->h + 8 : 0) + 6;
  return g;
}

}  // namespace

Rgb colormap(double t) {
  // matplotlib's viridis sampled at t = k/8.
  static constexpr Rgb kAnchors[] = {{68, 1, 84},    {71, 45, 123},  {59, 82, 139},  {44, 114, 142}, {33, 145, 140},
                                     {40, 174, 128}, {94, 201, 98},  {173, 220, 48}, {253, 231, 37}};
  constexpr int kLast = int(sizeof(kAnchors) / sizeof(kAnchors[0])) - 1;
  if (!(t > 0)) return kAnchors[0];  // also NaN
  if (t >= 1) return kAnchors[kLast];
  const double s = t * kLast;
  const int i = std::min(int(s), kLast - 1);
  const double f = s - i;
  auto mix = [f](uint8_t a, uint8_t b) { return uint8_t(std::lround(a + f * (double(b) - double(a)))); };
  const Rgb &a = kAnchors[i], &b = kAnchors[i + 1];
  return {mix(a.r, b.r), mix(a.g, b.g), mix(a.b, b.b)};
}

HeatMapLayout heatmap_layout(const HeatMap& h) { return heatmap_geometry(h).l; }

void write_heatmap(const std::string& path, const HeatMap& h) {
  const HeatMapGeometry g = heatmap_geometry(h);
  const HeatMapLayout& l = g.l;
  Image img = new_image(l.width, l.height);
  gdImagePtr im = img.get();
  gdFontPtr fs = font_small();
  auto t_of = [&](double v) { return (heat_tf(h, v) - g.lo) / (g.hi - g.lo); };

  if (!h.title.empty()) text_centred(im, font_bold(), l.width / 2, 10, h.title, kText);
  for (int i = 0; i < g.rows; ++i) {
    const int y = l.grid_y + i * l.cell_h;
    const std::string& rl = h.row_labels[size_t(i)];
    text(im, fs, l.grid_x - 6 - text_w(fs, rl), y + (l.cell_h - fs->h) / 2, rl, kText);
    for (int j = 0; j < g.cols; ++j) {
      const size_t k = size_t(i) * size_t(g.cols) + size_t(j);
      const int x = l.grid_x + j * l.cell_w;
      const double v = h.values[k];
      const Rgb c = heat_usable(h, v) ? colormap(t_of(v)) : kNoDataColor;
      // 1-pixel white gutter between cells.
      gdImageFilledRectangle(im, x, y, x + l.cell_w - 2, y + l.cell_h - 2, col(c));
      if (!h.marked.empty() && h.marked[k]) {
        gdImageRectangle(im, x, y, x + l.cell_w - 2, y + l.cell_h - 2, col(kMark));
        gdImageRectangle(im, x + 1, y + 1, x + l.cell_w - 3, y + l.cell_h - 3, col(kMark));
      }
      if (!h.cell_text.empty() && !h.cell_text[k].empty()) {
        const std::string& s = h.cell_text[k];
        const double lum = 0.299 * c.r + 0.587 * c.g + 0.114 * c.b;
        const Rgb tc = lum > 140 ? Rgb{0, 0, 0} : kWhite;
        for (gdFontPtr f : {fs, font_tiny()})
          if (text_w(f, s) <= l.cell_w - 5 && f->h <= l.cell_h - 3) {
            text(im, f, x + (l.cell_w - 1 - text_w(f, s)) / 2, y + (l.cell_h - 1 - f->h) / 2, s, tc);
            break;
          }
      }
    }
  }
  const int grid_bottom = l.grid_y + g.rows * l.cell_h;
  for (int j = 0; j < g.cols; ++j) {
    const int cx = l.grid_x + j * l.cell_w + l.cell_w / 2;
    const std::string& cl = h.col_labels[size_t(j)];
    if (g.vertical_col_labels)
      text_up_from(im, fs, cx, grid_bottom + 4 + text_w(fs, cl), cl, kText);
    else
      text_centred(im, fs, cx, grid_bottom + 4, cl, kText);
  }
  if (g.any_marked) {
    const int y = l.height - 6 - fs->h;
    gdImageRectangle(im, l.grid_x, y, l.grid_x + 12, y + fs->h - 2, col(kMark));
    gdImageRectangle(im, l.grid_x + 1, y + 1, l.grid_x + 11, y + fs->h - 3, col(kMark));
    text(im, fs, l.grid_x + 18, y, h.marked_label, kText);
  }

  // Colour bar: top = high values.
  const int bx = g.bar_x, by = l.grid_y, bh = g.bar_h;
  for (int p = 0; p < bh; ++p) gdImageLine(im, bx, by + p, bx + 17, by + p, col(colormap(1.0 - double(p) / (bh - 1))));
  gdImageRectangle(im, bx, by, bx + 17, by + bh - 1, col(kFrame));
  for (double v : g.ticks) {
    const int y = by + int(std::lround((1.0 - t_of(v)) * (bh - 1)));
    gdImageLine(im, bx + 17, y, bx + 21, y, col(kFrame));
    text(im, fs, bx + 24, y - fs->h / 2, tick_label(v), kText);
  }
  if (!h.colorbar_label.empty()) {
    int tick_w = 0;
    for (double v : g.ticks) tick_w = std::max(tick_w, text_w(fs, tick_label(v)));
    text_up(im, fs, bx + 24 + tick_w + 10 + fs->h / 2, by + bh / 2, h.colorbar_label, kText);
  }
  save_png(im, path, "heat map " + quoted(h.title));
}

void write_line_plot(const std::string& path, const LinePlot& p) {
  const std::string what = "line plot " + quoted(p.title);
  Axis ax, ay;
  ax.log = p.log_x, ay.log = p.log_y;
  double xmin = INFINITY, xmax = -INFINITY, ymin = INFINITY, ymax = -INFINITY;
  size_t usable = 0;
  for (const Series& s : p.series) {
    if (s.x.size() != s.y.size())
      fail("{}: series '{}' has {} x and {} y values", what, s.name, s.x.size(), s.y.size());
    for (size_t i = 0; i < s.x.size(); ++i)
      if (ax.usable(s.x[i]) && ay.usable(s.y[i])) {
        ++usable;
        xmin = std::min(xmin, s.x[i]), xmax = std::max(xmax, s.x[i]);
        ymin = std::min(ymin, s.y[i]), ymax = std::max(ymax, s.y[i]);
      }
  }
  if (usable == 0)
    fail("{}: no data to plot ({} series, no point with finite{} coordinates)", what, p.series.size(),
         p.log_x || p.log_y ? " positive (log axis)" : "");
  for (double v : p.hlines)
    if (ay.usable(v)) ymin = std::min(ymin, v), ymax = std::max(ymax, v);

  ax = make_axis(xmin, xmax, p.log_x, 0.02);
  ay = make_axis(ymin, ymax, p.log_y, 0.05);
  const std::vector<double> xticks = axis_ticks(ax, 8), yticks = axis_ticks(ay, 7);
  Image img = new_image(kPlotWidth, kPlotHeight);
  gdImagePtr im = img.get();
  const Frame f = place_frame(kPlotWidth, kPlotHeight, yticks, ax, ay);
  draw_axes(im, f, ax, ay, xticks, yticks, p.title, p.xlabel, p.ylabel);

  gdImageSetClip(im, f.x0 + 1, f.y0 + 1, f.x1 - 1, f.y1 - 1);
  for (double v : p.hlines)
    if (ay.usable(v)) {
      const int y = int(std::lround(ay.px(v)));
      dashed_hline(im, f.x0 + 1, f.x1 - 1, y, kRefLine);
      text(im, font_small(), f.x0 + 6, y - font_small()->h - 1, tick_label(v), kRefLine);
    }
  std::vector<std::pair<std::string, Rgb>> legend;
  for (size_t si = 0; si < p.series.size(); ++si) {
    const Series& s = p.series[si];
    const Rgb c = kSeries[si % kNumSeriesColours];
    if (!s.name.empty()) legend.emplace_back(s.name, c);
    const bool markers = s.x.size() <= 40;
    gdImageSetThickness(im, 2);
    bool have_prev = false;
    int px = 0, py = 0;
    for (size_t i = 0; i < s.x.size(); ++i) {
      if (!ax.usable(s.x[i]) || !ay.usable(s.y[i])) {
        have_prev = false;
        continue;
      }
      const int x = int(std::lround(ax.px(s.x[i]))), y = int(std::lround(ay.px(s.y[i])));
      if (have_prev) gdImageLine(im, px, py, x, y, col(c));
      if (markers) gdImageFilledEllipse(im, x, y, 6, 6, col(c));
      px = x, py = y, have_prev = true;
    }
    gdImageSetThickness(im, 1);
  }
  gdImageSetClip(im, 0, 0, kPlotWidth - 1, kPlotHeight - 1);
  draw_legend(im, f, legend);
  save_png(im, path, what);
}

void write_histogram(const std::string& path, const Histogram& h) {
  const std::string what = "histogram " + quoted(h.title);
  if (h.bins < 1 || h.bins > 100000) fail("{}: bins must be in [1, 100000], got {}", what, h.bins);
  Axis probe;
  probe.log = h.log_x;
  double vmin = INFINITY, vmax = -INFINITY;
  for (const Series& s : h.series)
    for (double v : s.y)
      if (probe.usable(v)) vmin = std::min(vmin, v), vmax = std::max(vmax, v);
  if (!(vmin <= vmax))
    fail("{}: no samples to bin ({} series, none finite{})", what, h.series.size(),
         h.log_x ? " and positive (log axis)" : "");

  // Bins span the data exactly (transformed units); the axis shows them with a small margin.
  const Axis bins_axis = make_axis(vmin, vmax, h.log_x, 0.0);
  const double b_lo = bins_axis.lo, b_w = (bins_axis.hi - bins_axis.lo) / h.bins;
  std::vector<std::vector<long>> counts(h.series.size(), std::vector<long>(size_t(h.bins), 0));
  std::vector<long> totals(h.series.size(), 0);
  long max_count = 0;
  for (size_t si = 0; si < h.series.size(); ++si) {
    for (double v : h.series[si].y) {
      if (!probe.usable(v)) continue;
      const int b = std::clamp(int((probe.tf(v) - b_lo) / b_w), 0, h.bins - 1);
      max_count = std::max(max_count, ++counts[si][size_t(b)]);
      ++totals[si];
    }
  }

  Axis ax = make_axis(vmin, vmax, h.log_x, 0.0);
  const double span = ax.hi - ax.lo;
  ax.lo -= 0.02 * span, ax.hi += 0.02 * span;
  Axis ay = make_axis(0.0, double(max_count), false, 0.0);
  ay.lo = 0, ay.hi = 1.08 * double(max_count);
  std::vector<double> xticks = axis_ticks(ax, 8), yticks = axis_ticks(ay, 6);
  if (max_count < 6) {  // counts are integers: no fractional ticks
    yticks.clear();
    for (long c = 0; c <= max_count; ++c) yticks.push_back(double(c));
  }
  Image img = new_image(kPlotWidth, kPlotHeight);
  gdImagePtr im = img.get();
  const Frame f = place_frame(kPlotWidth, kPlotHeight, yticks, ax, ay);
  draw_axes(im, f, ax, ay, xticks, yticks, h.title, h.xlabel, "count");

  std::vector<std::pair<std::string, Rgb>> legend;
  gdImageSetClip(im, f.x0 + 1, f.y0 + 1, f.x1 - 1, f.y1 - 1);
  gdImageSetThickness(im, 2);
  for (size_t si = 0; si < h.series.size(); ++si) {
    const Rgb c = kSeries[si % kNumSeriesColours];
    const std::string& name = h.series[si].name;
    legend.emplace_back(fmt::format("{}{}n={}", name, name.empty() ? "" : " ", totals[si]), c);
    if (totals[si] == 0) continue;
    // Outline: up the left edge of the first bin, along each bin's top, down the right edge of the last.
    const int y0 = int(std::lround(ay.px_t(0)));
    int prev_y = y0;
    for (int b = 0; b <= h.bins; ++b) {
      const int x = int(std::lround(ax.px_t(b_lo + b * b_w)));
      const int y = b < h.bins ? int(std::lround(ay.px_t(double(counts[si][size_t(b)])))) : y0;
      gdImageLine(im, x, prev_y, x, y, col(c));
      if (b < h.bins) gdImageLine(im, x, y, int(std::lround(ax.px_t(b_lo + (b + 1) * b_w))), y, col(c));
      prev_y = y;
    }
  }
  gdImageSetThickness(im, 1);
  gdImageSetClip(im, 0, 0, kPlotWidth - 1, kPlotHeight - 1);
  draw_legend(im, f, legend);
  save_png(im, path, what);
}

}  // namespace spear::plot
