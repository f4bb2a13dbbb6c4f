// The plot writers of a build configured with -DSPEAR_PLOTS=OFF (no libgd, e.g. a minimal binary carried to
// another machine): every writer refuses with a clear message instead of the build failing.
#include "core/error.h"
#include "plot/plot.h"

namespace spear::plot {

namespace {
[[noreturn]] void disabled(const std::string& path) {
  fail("cannot write {}: this build of spear has no PNG plots (configured with -DSPEAR_PLOTS=OFF)", path);
}
}  // namespace

Rgb colormap(double) { disabled("a colour map"); }
HeatMapLayout heatmap_layout(const HeatMap&) { disabled("a heat map"); }
void write_heatmap(const std::string& path, const HeatMap&) { disabled(path); }
void write_line_plot(const std::string& path, const LinePlot&) { disabled(path); }
void write_histogram(const std::string& path, const Histogram&) { disabled(path); }

}  // namespace spear::plot
