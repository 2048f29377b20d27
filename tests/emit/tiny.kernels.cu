// ========================================================================
// Kernels specialized for the model `tiny` (examples/tiny.moe).
// Each section names the layers whose constants it holds; its kernels are
// the generic ones of the templates above with those constants compiled in
// (template arguments of moert_<op>_impl), under the generic kernel's name
// with a key: moert_k_<op>__<key> (runtime/kernel_specs.def). The cuda
// backend launches one where the op's dims are its key, the generic kernel
// elsewhere. The capacity C and the world's shape (W, S, r, d) stay kernel
// arguments: one kernels.cu serves every world size. The cuda backend
// computes in fp32; the dtype is the spec's.
//
// Layers the generic kernels serve alone:
// layer 0: residual `residual_0` (M = 64, dtype fp32)
// layer 3: end `end_0` (M = 64, dtype fp32)
// layer 4: residual `residual_1` (M = 64, dtype fp32)
// layer 7: end `end_1` (M = 64, dtype fp32)
// layer 8: mse `mse` (M = 64, dtype fp32)

// ------------------------------------------------------------------------
// layer 1: rmsnorm `rmsnorm_0` (M = 64, dtype fp32)
// layer 5: rmsnorm `rmsnorm_1` (M = 64, dtype fp32)
extern "C" __global__ void moert_k_rmsnorm_fwd__D64(const float *x, const float *g, float *y,
    float *rstd, long long rows, long long dim, float eps) {
  moert_rmsnorm_fwd_impl<64>(x, g, y, rstd, rows, dim, eps);
}
extern "C" __global__ void moert_k_rmsnorm_bwd_dx__D64(const float *x, const float *g,
    const float *rstd, const float *dy, float *dx, long long rows, long long dim) {
  moert_rmsnorm_bwd_dx_impl<64>(x, g, rstd, dy, dx, rows, dim);
}

// ------------------------------------------------------------------------
// layer 2: moe `experts_0` (E = 4, k = 2, M = 64, H = 128, gate softmax, dtype fp32)
// layer 6: moe `experts_1` (E = 4, k = 2, M = 64, H = 128, gate softmax, dtype fp32)
extern "C" __global__ void moert_k_gate_topk__E4_K2(const float *logits, const float *noise,
    float *scores, int *idx, float *topv, long long tokens, long long experts, long long top_k) {
  moert_gate_topk_impl<4, 2>(logits, noise, scores, idx, topv, tokens, experts, top_k);
}
extern "C" __global__ void moert_k_gate_normalize__K2(const float *topv, float *gate,
    long long tokens, long long top_k, int normalize) {
  moert_gate_normalize_impl<2>(topv, gate, tokens, top_k, normalize);
}
extern "C" __global__ void moert_k_gate_locations__K2(const int *idx, const int *order, int *loc,
    int *counts, long long tokens, long long experts, long long top_k) {
  moert_gate_locations_impl<2>(idx, order, loc, counts, tokens, experts, top_k);
}
extern "C" __global__ void moert_k_gate_stats_part__E4_K2(const float *scores, const int *idx,
    long long rows, long long ld, long long w, long long rpc, long long c0, long long top_k,
    double *part_sum, double *part_count) {
  moert_gate_stats_part_impl<4, 2>(scores, idx, rows, ld, w, rpc, c0, top_k, part_sum, part_count);
}
extern "C" __global__ void moert_k_gate_normalize_bwd__K2(const float *topv, const float *dgate,
    float *dtopv, long long tokens, long long top_k, int normalize) {
  moert_gate_normalize_bwd_impl<2>(topv, dgate, dtopv, tokens, top_k, normalize);
}
extern "C" __global__ void moert_k_gate_scores_bwd__E4_K2(const int *idx, const float *dtopv,
    const float *dscore_coef, float weight, float *dscores, long long tokens, long long experts,
    long long top_k) {
  moert_gate_scores_bwd_impl<4, 2>(idx, dtopv, dscore_coef, weight, dscores, tokens, experts, top_k);
}
extern "C" __global__ void moert_k_softmax_bwd__D4(const float *scores, const float *dscores,
    float *dlogits, long long rows, long long cols) {
  moert_softmax_bwd_impl<4>(scores, dscores, dlogits, rows, cols);
}
