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
    const float *bias, float *scores, int *idx, float *topv, float *gate, int normalize,
    int sigmoid, long long groups, long long top_groups, float route_scale, int ec, int *top1,
    double *norm, double *part, long long pw, int z, int ent, long long tokens, long long experts,
    long long top_k) {
  moert_gate_topk_impl<4, 2>(logits, noise, bias, scores, idx, topv, gate, normalize, sigmoid, groups, top_groups, route_scale, ec, top1, norm, part, pw, z, ent, tokens, experts, top_k);
}
extern "C" __global__ void moert_k_gate_locations__K2(const int *idx, const int *order, int *loc,
    int *counts, const double *part, long long nparts, long long pw, float *score_sum,
    float *top1_count, float *dscore_coef, double global_tokens, float *loss, unsigned *done,
    float *z_sum, float *entropy_sum, long long tokens, long long experts, long long top_k) {
  moert_gate_locations_impl<2>(idx, order, loc, counts, part, nparts, pw, score_sum, top1_count, dscore_coef, global_tokens, loss, done, z_sum, entropy_sum, tokens, experts, top_k);
}
extern "C" __global__ void moert_k_gate_bwd__E4_K2(const float *scores, const int *idx,
    const float *topv, const float *dgate, const float *dscore_coef, float weight,
    const float *logits, const float *noise, float z_weight, double global_tokens, float *dlogits,
    long long tokens, long long experts, long long top_k, int normalize, int sigmoid,
    float route_scale, int ec) {
  moert_gate_bwd_impl<4, 2>(scores, idx, topv, dgate, dscore_coef, weight, logits, noise, z_weight, global_tokens, dlogits, tokens, experts, top_k, normalize, sigmoid, route_scale, ec);
}
