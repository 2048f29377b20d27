/* test_cost.c — the cost model's pieces against values computed by hand:
 * the alpha-beta all-to-all per phase (linear and 2dh, one node and two),
 * the ring collectives, the --net parser (units, "Nx", errors), the GEMM
 * curve's interpolation, and the calibration reader's refusals. */
#include <math.h>
#include <string.h>

#include "check.h"
#include "cost.h"

static bool near(double a, double b) { return fabs(a - b) <= 1e-9 * fabs(b) + 1e-15; }

static void test_a2a(void) {
  moert_net n;
  moert_net_defaults(&n); /* 450 GB/s NVLink, 8 x 400 Gb/s = 400 GB/s a node, 3 us / 10 us, 8 a node */
  double intra, inter, t;
  /* 16 ranks (2 nodes), 16 MB sent by each rank in all.
   * linear: intra = 7 * 3us + 16e6 * 7/16 / 450e9 = 21us + 15.556us = 36.556us
   *         inter = 8 * 10us + 16e6 * 8/16 / (400e9 / 8) = 80us + 160us = 240us; total the longer */
  t = moert_cost_a2a(MOERT_A2A_LINEAR, 16e6, 16, &n, &intra, &inter);
  CHECK(near(intra, 21e-6 + 16e6 * 7 / 16 / 450e9), "linear intra %g", intra);
  CHECK(near(inter, 240e-6), "linear inter %g", inter);
  CHECK(near(t, 240e-6), "linear total %g", t);
  /* 2dh: intra = 7 * 3us + 16e6 * 7/8 / 450e9 = 21us + 31.111us
   *      inter = 1 * 10us + 16e6 * 1/2 / 50e9 = 10us + 160us; total the sum */
  t = moert_cost_a2a(MOERT_A2A_2DH, 16e6, 16, &n, &intra, &inter);
  CHECK(near(intra, 21e-6 + 16e6 * 7 / 8 / 450e9), "2dh intra %g", intra);
  CHECK(near(inter, 170e-6), "2dh inter %g", inter);
  CHECK(near(t, 21e-6 + 16e6 * 7 / 8 / 450e9 + 170e-6), "2dh total %g", t);
  /* 2,048 ranks, 1 MB: linear pays 2,040 inter-node messages, 2dh 255:
   * linear inter = 2040 * 10us + 1e6 * 2040/2048 / 50e9 = 20.4ms + 19.92us
   * 2dh inter = 255 * 10us + 1e6 * 255/256 / 50e9 = 2.55ms + 19.92us */
  t = moert_cost_a2a(MOERT_A2A_LINEAR, 1e6, 2048, &n, &intra, &inter);
  CHECK(near(t, 2040 * 10e-6 + 1e6 * 2040.0 / 2048 / 50e9), "linear at 2048: %g", t);
  t = moert_cost_a2a(MOERT_A2A_2DH, 1e6, 2048, &n, &intra, &inter);
  CHECK(near(inter, 255 * 10e-6 + 1e6 * 255.0 / 256 / 50e9), "2dh inter at 2048: %g", inter);
  CHECK(near(intra, 7 * 3e-6 + 1e6 * 7.0 / 8 / 450e9), "2dh intra at 2048: %g", intra);
  /* one node of 4: both algorithms are one intra-node phase:
   * 3 * 3us + 4e6 * 3/4 / 450e9 */
  t = moert_cost_a2a(MOERT_A2A_2DH, 4e6, 4, &n, &intra, &inter);
  CHECK(near(t, 9e-6 + 4e6 * 0.75 / 450e9) && inter == 0, "one node: %g (inter %g)", t, inter);
  CHECK(moert_cost_a2a(MOERT_A2A_LINEAR, 4e6, 1, &n, &intra, &inter) == 0, "one rank sends nothing");
  /* rings: 8 ranks inside a node, 16 across */
  CHECK(near(moert_cost_ring(8e6, 8, &n), 7 * 3e-6 + 8e6 * 7 / 8 / 450e9), "ring of 8");
  CHECK(near(moert_cost_ring(8e6, 16, &n), 15 * 10e-6 + 8e6 * 15 / 16 / 50e9), "ring of 16");
}

static void test_net(void) {
  moert_net n;
  moert_status st = {0};
  moert_net_defaults(&n);
  CHECK(moert_net_parse("nvlink=900GB/s,ib=4x200Gb/s,alpha_intra=2us,alpha_inter=0.5ms,overlap=0.5", NULL, &n, &st),
        "parse: %s", st.msg);
  CHECK(near(n.nvlink, 900e9) && near(n.ib, 4 * 25e9) && near(n.alpha_intra, 2e-6) && near(n.alpha_inter, 5e-4) &&
            n.overlap == 0.5,
        "values %g %g %g %g %g", n.nvlink, n.ib, n.alpha_intra, n.alpha_inter, n.overlap);
  const char *bad[] = {"nvlink", "nvlink=fast", "nvlink=450", "speed=1GB/s", "alpha_intra=3", "overlap=2",
                       "ib=0GB/s", "nvlink=measured", "alpha_inter=3GB/s"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    moert_status e = {0};
    CHECK(!moert_net_parse(bad[i], NULL, &n, &e) && strstr(e.msg, "--net"), "`%s` refused with a message: %s",
          bad[i], e.msg);
  }
}

static const char *CAL = "{\"format\": \"moec-calibration\", \"version\": 1, \"device\": \"test\", \"backend\": \"cpu\","
                         " \"dtype_bytes\": 4, \"launch_s\": 1e-6,"
                         " \"gemm\": [{\"kind\": \"nn\", \"flops\": 1e6, \"flops_per_s\": 1e9},"
                         " {\"kind\": \"nn\", \"flops\": 1e8, \"flops_per_s\": 3e9},"
                         " {\"kind\": \"nn\", \"flops\": 1e8, \"flops_per_s\": 5e9},"
                         " {\"kind\": \"tn\", \"flops\": 1e6, \"flops_per_s\": 2e9},"
                         " {\"kind\": \"nt\", \"flops\": 1e6, \"flops_per_s\": 2e9}],"
                         " \"bandwidth\": {\"gate\": 1e9, \"gate_bwd\": 1e9, \"dispatch\": 1e9, \"combine\": 1e9,"
                         " \"dispatch_bwd\": 1e9, \"combine_bwd\": 1e9, \"act\": 1e9, \"copy\": 1e9},"
                         " \"a2a\": {\"ranks\": 2, \"alpha_s\": 5e-6, \"beta_bytes_per_s\": 2e9}}";

static void test_calib(void) {
  moert_calib c;
  moert_status st = {0};
  CHECK(moert_calib_parse(CAL, "t.json", &c, &st), "parse: %s", st.msg);
  /* 1e6 flops: 1 GFLOP/s; 1e8: the mean of the two points, 4 GFLOP/s;
   * 1e7, halfway in log: 2.5 GFLOP/s; beyond the ends: flat */
  CHECK(near(moert_calib_gemm_s(&c, MOERT_GEMM_NN, 1e6), 1e-6 + 1e-3), "at a point");
  CHECK(near(moert_calib_gemm_s(&c, MOERT_GEMM_NN, 1e8), 1e-6 + 1e8 / 4e9), "two points of one size: their mean");
  CHECK(near(moert_calib_gemm_s(&c, MOERT_GEMM_NN, 1e7), 1e-6 + 1e7 / 2.5e9), "interpolated in log flops");
  CHECK(near(moert_calib_gemm_s(&c, MOERT_GEMM_NN, 1e10), 1e-6 + 1e10 / 4e9), "flat beyond the largest");
  CHECK(near(moert_calib_gemm_s(&c, MOERT_GEMM_NN, 1e3), 1e-6 + 1e3 / 1e9), "flat below the smallest");
  moert_net n;
  moert_net_defaults(&n);
  CHECK(moert_net_parse("nvlink=measured,alpha_intra=measured", &c, &n, &st) && n.nvlink == 2e9 &&
            n.alpha_intra == 5e-6,
        "measured: %g %g %s", n.nvlink, n.alpha_intra, st.msg);
  /* written and read back: the same numbers */
  char buf[8192];
  FILE *f = fmemopen(buf, sizeof buf, "w");
  moert_calib_write(&c, f);
  fclose(f);
  moert_calib d;
  CHECK(moert_calib_parse(buf, "written", &d, &st), "read back: %s", st.msg);
  CHECK(d.npoints == c.npoints && d.bw[MOERT_K_COPY] == 1e9 && d.has_a2a && d.a2a_beta == 2e9, "read back equal");
  struct {
    const char *text, *want;
  } bad[] = {{"garbage", "bad JSON"},
             {"{\"format\": \"other\"}", "not a calibration"},
             {"{\"format\": \"moec-calibration\", \"version\": 7}", "version"},
             {"{\"format\": \"moec-calibration\", \"version\": 1, \"dtype_bytes\": 4, \"launch_s\": 0, \"gemm\": []}",
              "no `gemm`"},
             {"{\"format\": \"moec-calibration\", \"version\": 1, \"dtype_bytes\": 4, \"launch_s\": 0, \"gemm\": "
              "[{\"kind\": \"nn\", \"flops\": 1, \"flops_per_s\": -1}]}",
              "not a measurement"},
             {"{\"format\": \"moec-calibration\", \"version\": 1, \"dtype_bytes\": 4, \"launch_s\": 0, \"gemm\": "
              "[{\"kind\": \"nn\", \"flops\": 1, \"flops_per_s\": 1}]}",
              "no GEMM of kind \"tn\""}};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    moert_status e = {0};
    CHECK(!moert_calib_parse(bad[i].text, "bad.json", &c, &e) && strstr(e.msg, bad[i].want) &&
              strstr(e.msg, "bad.json"),
          "bad calibration %zu: %s", i, e.msg);
  }
  moert_status e = {0};
  CHECK(!moert_calib_load("/nonexistent/cal.json", &c, NULL, &e) && strstr(e.msg, "cannot read"), "missing: %s",
        e.msg);
}

int main(void) {
  test_a2a();
  test_net();
  test_calib();
  printf("test_cost: %d passed, %d failed\n", g_pass, g_fail);
  return g_fail ? 1 : 0;
}
