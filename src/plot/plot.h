#pragma once
// PNG plots drawn with libgd and its built-in bitmap fonts (ASCII text only; other bytes print as '?'):
// the layer × module sensitivity heat map of the placement diagnostic (DESIGN.md §3), training and sweep
// curves, and value distributions. Every writer throws spear::Error on empty or inconsistent data and on I/O
// failure, naming the plot and the file.
#include <cstdint>
#include <string>
#include <vector>

namespace spear::plot {

struct Rgb {
  uint8_t r = 0, g = 0, b = 0;
  bool operator==(const Rgb&) const = default;
};

// Perceptual colour map (viridis, linear between 9 anchors): t = 0 dark purple, t = 1 yellow; t is clamped.
Rgb colormap(double t);
// Heat map cells without data (NaN, or ≤ 0 on a log scale).
inline constexpr Rgb kNoDataColor{190, 190, 190};

inline constexpr int kPlotWidth = 900, kPlotHeight = 600;  // line plots and histograms

struct HeatMap {
  std::string title, colorbar_label;
  std::vector<std::string> row_labels, col_labels;  // define the shape: rows × cols
  std::vector<double> values;                       // [rows, cols] row-major; NaN = no data
  std::vector<uint8_t> marked;                      // [rows, cols] or empty: cells outlined (e.g. chosen ECs)
  std::vector<std::string> cell_text;               // [rows, cols] or empty: text drawn in the cell (e.g. rank)
  bool log_scale = false;                           // colour by log10(value); values ≤ 0 count as no data
  std::string marked_label = "marked";              // legend text for the outline
};

// Where the heat map puts things (pixels): cell (i, j) covers x ∈ [grid_x + j·cell_w, +cell_w),
// y ∈ [grid_y + i·cell_h, +cell_h). The image is width × height and grows with rows and columns.
struct HeatMapLayout {
  int width = 0, height = 0;
  int grid_x = 0, grid_y = 0;
  int cell_w = 0, cell_h = 0;
};
HeatMapLayout heatmap_layout(const HeatMap& h);  // validates h like write_heatmap
void write_heatmap(const std::string& path, const HeatMap& h);

struct Series {
  std::string name;       // legend entry ("" = none)
  std::vector<double> x, y;  // same length; non-finite points (or ≤ 0 on a log axis) break the line
};

struct LinePlot {
  std::string title, xlabel, ylabel;
  std::vector<Series> series;
  bool log_x = false, log_y = false;
  std::vector<double> hlines;  // dashed horizontal reference lines (e.g. a goal), labelled with their value
};
void write_line_plot(const std::string& path, const LinePlot& p);  // kPlotWidth × kPlotHeight

struct Histogram {
  std::string title, xlabel;
  std::vector<Series> series;  // only y (the samples) is used; one outline per series on shared bins
  int bins = 50;
  bool log_x = false;          // log-spaced bins; samples ≤ 0 are dropped
};
void write_histogram(const std::string& path, const Histogram& h);  // kPlotWidth × kPlotHeight

}  // namespace spear::plot
