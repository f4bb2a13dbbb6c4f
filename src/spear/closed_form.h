#pragma once
// Stage 1 of EC training (DESIGN.md §2): closed-form low-rank factors B·A for one module, from its weight
// error and input statistics. All linear algebra in fp64; the factors are returned in fp32 (the EC's format).
//
// Shapes (row-major): dW, C [out, in]; R [in, in]; A [rank, in]; B [out, rank].
#include <string>
#include <vector>

namespace spear {

enum class EcInit {
  Svd,        // truncated SVD of ΔW: optimal in the plain Frobenius norm, blind to the inputs
  Lqer,       // ΔW·diag(E|x|): diagonal activation scaling (LQER)
  QeraExact,  // ΔW·R^½ (QERA-exact / EoRA): optimal for the expected output error E‖(ΔW − BA)x‖²
  Regression  // least-squares map from the quantized model's inputs to the FP output residual (regression_init)
};

// "svd" | "lqer" | "qera" | "regression"; throws spear::Error listing the choices.
EcInit parse_ec_init(const std::string& s);
const char* ec_init_name(EcInit m);

struct LowRankFactors {
  int rank = 0;
  std::vector<float> A;  // [rank, in]
  std::vector<float> B;  // [out, rank]
  // Every singular value, descending, of the matrix that was truncated: ΔW (Svd), ΔW·S (Lqer), ΔW·L
  // (QeraExact), C·L⁻ᵀ (Regression). For QeraExact/Regression, Σ_{i>rank} σ_i² is the weighted error left.
  std::vector<double> singular_values;
};

// dW = W − Q [out, in]; R = E[x xᵀ] [in, in] (symmetric PSD; needed by QeraExact, may be null otherwise);
// mean_abs_x = E|x| [in] (needed by Lqer, may be null otherwise). rank must be ≥ 1; a rank above
// min(out, in) gives exact factors padded with zero rows / columns (A, B keep the requested rank).
// Regression is not accepted here (use regression_init).
//   Svd:       ΔW = U Σ Vᵀ,           B = U_r Σ_r^½,  A = Σ_r^½ V_rᵀ
//   Lqer:      S = diag(max(E|x|, 1e-6·max E|x|)),  ΔW·S = U Σ Vᵀ,  B = U_r Σ_r^½,  A = Σ_r^½ V_rᵀ S⁻¹
//   QeraExact: L·Lᵀ = R,  ΔW·L = P Σ Vᵀ,  B = P_r Σ_r^½,  A = Σ_r^½ V_rᵀ L⁻¹
// R's eigenvalues are floored at δ = eps_rel·λ_max(R). Any square root L of R gives the same B·A and Σ
// (DESIGN's L = U Λ^½ differs from the Cholesky factor used here by an orthogonal factor); see InputRoot in
// closed_form.cpp for how the floor is applied (exactly when no eigenvalue is near it, else as a ridge).
LowRankFactors closed_form_init(EcInit method, int rank, int out, int in, const double* dW, const double* R,
                                const double* mean_abs_x, double eps_rel = 1e-8);

// Regression target. C = E[(y_fp − Q·x_q) x_qᵀ] [out, in] is the cross moment of the residual the EC must
// produce with the quantized model's inputs x_q at this module, R = E[x_q x_qᵀ] [in, in]. The least-squares
// map M = C R⁻¹ is truncated in the R-weighted norm: SVD of M·L = C·L⁻ᵀ (= C·U·Λ^-½ for L = U Λ^½; a
// triangular solve, no explicit inverse), then B, A as in QeraExact. With C = ΔW·R (no propagated error) this
// is QeraExact.
LowRankFactors regression_init(int rank, int out, int in, const double* C, const double* R, double eps_rel = 1e-8);

// Activation-weighted error ‖(ΔW − B·A)·L‖_F² = tr((ΔW − BA) R (ΔW − BA)ᵀ), i.e. E‖(ΔW − BA) x‖² when R = E[x xᵀ].
double weighted_error(int out, int in, const double* dW, const float* A, const float* B, int rank, const double* R);

}  // namespace spear
