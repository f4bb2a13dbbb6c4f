#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <random>

#include <gd.h>
#include <gtest/gtest.h>

#include "plot/plot.h"
#include "test_util.h"

namespace spear::plot {
namespace {

struct ImageDeleter {
  void operator()(gdImagePtr im) const { gdImageDestroy(im); }
};
using Image = std::unique_ptr<gdImage, ImageDeleter>;

// Reads the PNG back with libgd (null when it is not a readable PNG).
Image read_png(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) return nullptr;
  Image im(gdImageCreateFromPng(f));
  std::fclose(f);
  return im;
}

Rgb pixel(gdImagePtr im, int x, int y) {
  const int c = gdImageGetTrueColorPixel(im, x, y);
  return {uint8_t(gdTrueColorGetRed(c)), uint8_t(gdTrueColorGetGreen(c)), uint8_t(gdTrueColorGetBlue(c))};
}

std::string show(Rgb c) { return fmt::format("({}, {}, {})", c.r, c.g, c.b); }

// A layer × module sensitivity map like the diagnostic's: 6 layers × 7 modules.
HeatMap sensitivity_map() {
  HeatMap h;
  h.title = "1 - CKA per module (W4 RTN)";
  h.colorbar_label = "damage";
  for (int l = 0; l < 6; ++l) h.row_labels.push_back("layer " + std::to_string(l));
  h.col_labels = {"q", "k", "v", "o", "gate", "up", "down"};
  for (int l = 0; l < 6; ++l)
    for (int m = 0; m < 7; ++m) h.values.push_back(1e-4 * (1 + l) * (1 + (m * 3) % 7));
  return h;
}

TEST(Plot, ColormapEndsAndMonotoneLightness) {
  EXPECT_EQ(colormap(0.0), (Rgb{68, 1, 84}));
  EXPECT_EQ(colormap(1.0), (Rgb{253, 231, 37}));
  EXPECT_EQ(colormap(-3.0), colormap(0.0));
  EXPECT_EQ(colormap(7.0), colormap(1.0));
  EXPECT_EQ(colormap(NAN), colormap(0.0));
  double prev = -1;
  for (int i = 0; i <= 100; ++i) {
    const Rgb c = colormap(i / 100.0);
    const double lum = 0.2126 * c.r + 0.7152 * c.g + 0.0722 * c.b;
    EXPECT_GT(lum, prev - 0.5) << i;  // perceptual maps get lighter monotonically
    prev = lum;
  }
}

TEST(Plot, HeatMapColoursExtremesAndNoData) {
  const std::string dir = test::scratch_dir("plot_heat");
  HeatMap h = sensitivity_map();
  // Put the extremes and a hole at known cells.
  h.values[2 * 7 + 3] = 5.0;    // largest
  h.values[4 * 7 + 1] = -1.0;   // smallest
  h.values[0 * 7 + 6] = NAN;    // no data
  h.marked.assign(h.values.size(), 0);
  h.marked[1 * 7 + 2] = 1;
  h.cell_text.assign(h.values.size(), "");
  h.cell_text[5 * 7 + 5] = "16";
  const std::string path = dir + "/heat.png";
  write_heatmap(path, h);
  const HeatMapLayout l = heatmap_layout(h);
  Image im = read_png(path);
  ASSERT_TRUE(im) << path;
  EXPECT_EQ(gdImageSX(im.get()), l.width);
  EXPECT_EQ(gdImageSY(im.get()), l.height);
  EXPECT_GE(l.width, 7 * l.cell_w);
  EXPECT_GE(l.height, 6 * l.cell_h);
  auto centre = [&](int i, int j) {
    return pixel(im.get(), l.grid_x + j * l.cell_w + l.cell_w / 2, l.grid_y + i * l.cell_h + l.cell_h / 2);
  };
  EXPECT_EQ(centre(2, 3), colormap(1.0)) << show(centre(2, 3));
  EXPECT_EQ(centre(4, 1), colormap(0.0)) << show(centre(4, 1));
  EXPECT_EQ(centre(0, 6), kNoDataColor) << show(centre(0, 6));
  // The marked cell's corner is outlined (red), its centre keeps the data colour.
  const Rgb corner = pixel(im.get(), l.grid_x + 2 * l.cell_w, l.grid_y + 1 * l.cell_h);
  EXPECT_GT(corner.r, 200);
  EXPECT_LT(corner.g, 80);
  EXPECT_NE(centre(1, 2), corner);
}

TEST(Plot, HeatMapLogScaleAndGrowth) {
  const std::string dir = test::scratch_dir("plot_heat_log");
  HeatMap h = sensitivity_map();
  h.log_scale = true;
  h.values[3] = 0.0;  // not representable on a log scale: drawn as no data
  h.values[10] = 0.9;
  h.values[11] = 1e-6;
  write_heatmap(dir + "/log.png", h);
  const HeatMapLayout l = heatmap_layout(h);
  Image im = read_png(dir + "/log.png");
  ASSERT_TRUE(im);
  auto centre = [&](int k) {
    return pixel(im.get(), l.grid_x + (k % 7) * l.cell_w + l.cell_w / 2, l.grid_y + (k / 7) * l.cell_h + l.cell_h / 2);
  };
  EXPECT_EQ(centre(3), kNoDataColor);
  EXPECT_EQ(centre(10), colormap(1.0));
  EXPECT_EQ(centre(11), colormap(0.0));

  // Many rows and long column labels: the image grows instead of squeezing the cells to nothing.
  HeatMap big;
  big.title = "big";
  for (int i = 0; i < 80; ++i) big.row_labels.push_back(std::to_string(i));
  for (int j = 0; j < 7; ++j) big.col_labels.push_back("model.layers.N.mlp.proj" + std::to_string(j));
  big.values.assign(80 * 7, 1.0);  // constant: one colour, no division by zero
  write_heatmap(dir + "/big.png", big);
  const HeatMapLayout lb = heatmap_layout(big);
  EXPECT_GE(lb.cell_h, 12);
  EXPECT_GT(lb.height, l.height);
  Image ib = read_png(dir + "/big.png");
  ASSERT_TRUE(ib);
  EXPECT_EQ(gdImageSY(ib.get()), lb.height);
}

TEST(Plot, HeatMapRejectsBadInput) {
  const std::string dir = test::scratch_dir("plot_heat_bad");
  HeatMap empty;
  empty.title = "nothing";
  EXPECT_SPEAR_ERROR(write_heatmap(dir + "/e.png", empty), "no data");
  HeatMap h = sensitivity_map();
  h.values.pop_back();
  EXPECT_SPEAR_ERROR(write_heatmap(dir + "/s.png", h), "41 values for 6 rows x 7 columns");
  h = sensitivity_map();
  h.marked.assign(3, 1);
  EXPECT_SPEAR_ERROR(write_heatmap(dir + "/m.png", h), "marked has 3 entries");
  h = sensitivity_map();
  for (double& v : h.values) v = NAN;
  EXPECT_SPEAR_ERROR(write_heatmap(dir + "/n.png", h), "no finite values");
  EXPECT_SPEAR_ERROR(write_heatmap(dir + "/no/such/dir/x.png", sensitivity_map()), "cannot open");
  EXPECT_FALSE(std::filesystem::exists(dir + "/e.png"));
}

TEST(Plot, LinePlot) {
  const std::string dir = test::scratch_dir("plot_line");
  LinePlot p;
  p.title = "gap closed vs EC budget";
  p.xlabel = "EC bytes / quantized bytes (%)";
  p.ylabel = "gap closed (%)";
  p.hlines = {35.0};
  Series a{"static", {}, {}}, b{"gated", {}, {}};
  for (double x : {0.25, 0.5, 1.0, 2.0, 3.0}) {
    a.x.push_back(x), a.y.push_back(20 + 4 * x);
    b.x.push_back(x), b.y.push_back(19 + 4.2 * x);
  }
  b.y[2] = NAN;  // a gap in the line
  p.series = {a, b};
  write_line_plot(dir + "/line.png", p);
  Image im = read_png(dir + "/line.png");
  ASSERT_TRUE(im);
  EXPECT_EQ(gdImageSX(im.get()), kPlotWidth);
  EXPECT_EQ(gdImageSY(im.get()), kPlotHeight);
  // Both series colours appear somewhere (lines were drawn).
  int blue = 0, orange = 0;
  for (int y = 0; y < kPlotHeight; ++y)
    for (int x = 0; x < kPlotWidth; ++x) {
      const Rgb c = pixel(im.get(), x, y);
      blue += c == Rgb{31, 119, 180};
      orange += c == Rgb{255, 127, 14};
    }
  EXPECT_GT(blue, 100);
  EXPECT_GT(orange, 100);

  // Log axes, one long series without markers.
  LinePlot q;
  q.title = "loss";
  q.log_x = q.log_y = true;
  Series s{"train KL", {}, {}};
  for (int i = 1; i <= 400; ++i) s.x.push_back(i), s.y.push_back(2.0 / std::sqrt(i));
  s.y.push_back(0.0);  // ≤ 0 on a log axis: skipped
  s.x.push_back(401);
  q.series = {s};
  write_line_plot(dir + "/log.png", q);
  ASSERT_TRUE(read_png(dir + "/log.png"));
}

TEST(Plot, LinePlotRejectsBadInput) {
  const std::string dir = test::scratch_dir("plot_line_bad");
  LinePlot p;
  p.title = "empty";
  EXPECT_SPEAR_ERROR(write_line_plot(dir + "/a.png", p), "no data to plot");
  p.series = {Series{"nan", {1, 2}, {NAN, NAN}}};
  EXPECT_SPEAR_ERROR(write_line_plot(dir + "/b.png", p), "no data to plot");
  p.series = {Series{"neg", {1, 2}, {-1, -2}}};
  p.log_y = true;
  EXPECT_SPEAR_ERROR(write_line_plot(dir + "/c.png", p), "log axis");
  p.series = {Series{"ragged", {1, 2, 3}, {1, 2}}};
  EXPECT_SPEAR_ERROR(write_line_plot(dir + "/d.png", p), "3 x and 2 y");
  p.series = {Series{"ok", {1, 2}, {1, 2}}};
  EXPECT_SPEAR_ERROR(write_line_plot(dir + "/missing/d.png", p), "cannot open");
  // A single point still makes a plot (degenerate ranges are widened).
  p.series = {Series{"one", {3}, {3}}};
  write_line_plot(dir + "/one.png", p);
  EXPECT_TRUE(read_png(dir + "/one.png"));
}

TEST(Plot, Histogram) {
  const std::string dir = test::scratch_dir("plot_hist");
  std::mt19937_64 rng(1);
  std::normal_distribution<double> nd;
  Histogram h;
  h.title = "|x| per channel";
  h.xlabel = "value";
  Series a{"fp16", {}, {}}, b{"w4", {}, {}};
  for (int i = 0; i < 5000; ++i) a.y.push_back(nd(rng)), b.y.push_back(0.5 + 1.5 * nd(rng));
  h.series = {a, b};
  write_histogram(dir + "/h.png", h);
  Image im = read_png(dir + "/h.png");
  ASSERT_TRUE(im);
  EXPECT_EQ(gdImageSX(im.get()), kPlotWidth);
  EXPECT_EQ(gdImageSY(im.get()), kPlotHeight);

  h.log_x = true;  // negative samples dropped
  h.bins = 30;
  write_histogram(dir + "/hl.png", h);
  EXPECT_TRUE(read_png(dir + "/hl.png"));

  Histogram one;
  one.series = {Series{"const", {}, {2.0, 2.0, 2.0}}};
  write_histogram(dir + "/c.png", one);
  EXPECT_TRUE(read_png(dir + "/c.png"));
}

TEST(Plot, HistogramRejectsBadInput) {
  const std::string dir = test::scratch_dir("plot_hist_bad");
  Histogram h;
  h.title = "none";
  EXPECT_SPEAR_ERROR(write_histogram(dir + "/a.png", h), "no samples");
  h.series = {Series{"empty", {}, {}}, Series{"nan", {}, {NAN}}};
  EXPECT_SPEAR_ERROR(write_histogram(dir + "/b.png", h), "no samples");
  h.series = {Series{"ok", {}, {1, 2, 3}}};
  h.bins = 0;
  EXPECT_SPEAR_ERROR(write_histogram(dir + "/c.png", h), "bins");
  h.bins = 10;
  EXPECT_SPEAR_ERROR(write_histogram(dir + "/nope/c.png", h), "cannot open");
}

}  // namespace
}  // namespace spear::plot
