/* select.h — picks, for every MoE layer and step, one of its variants
 * (docs/DESIGN.md, "The selector"). Per (layer, capacity bucket: C rounded up to a
 * power of two) it keeps each candidate's measured times; it explores every
 * candidate explore_steps times, in turn, after one unrecorded warm-up run of
 * each (first runs pay for lazy connections and cold caches), then uses the
 * fastest (lowest mean); a bucket seen for the first time is explored anew. Times are max-reduced
 * over ranks before they are recorded, so every rank holds the same table and
 * picks the same variant. Other modes: fixed (the first candidate), forced
 * (--variant), cycle (the next candidate every step, for tests). */
#ifndef MOERT_SELECT_H
#define MOERT_SELECT_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "placement.h"
#include "status.h"

typedef enum { MOERT_PICK_AUTO, MOERT_PICK_FIXED, MOERT_PICK_CYCLE, MOERT_PICK_PREDICTED } moert_pick_mode;

typedef struct moert_selector moert_selector;

/* forced: NULL or the --variant values ("r=1,d=2,a2a=linear", "cycle",
 * "LAYER:r=...") of the command line, nforced of them. Fails, naming the fix,
 * when a forced variant exists in no layer (or not in the named layer). */
/* Whether a --variant value has the form of one: `cycle`, or
 * `r=R,d=D,a2a=linear|2dh`, or `LAYER:` before that (whether a layer has
 * that variant is the selector's to say, later). */
bool moert_variant_well_formed(const char *value);
bool moert_selector_create(const moert_plan *plan, moert_pick_mode mode, int64_t explore_steps,
                           const char *const *forced, int nforced, moert_selector **out,
                           moert_status *st);
void moert_selector_destroy(moert_selector *s);
/* With the cost model (cost.h) on the calibration the binary carries
 * (moert_model.calibration) and the network of MOEC_NET (cost.h's --net
 * syntax; ranks_per_node ranks a node): `select = predicted` picks each
 * bucket's predicted best and explores nothing; `select = auto` explores
 * the candidates one after another in predicted order (each one's warm-up
 * run, then explore_steps measured ones) and stops at the first candidate
 * predicted MOERT_PRUNE times slower than the best measured so far. Without
 * a calibration, auto explores every candidate in the spec's order (in
 * rounds) and `select = predicted` fails, saying how to give one. Does
 * nothing under a forced variant or cycle. */
#define MOERT_PRUNE 1.5
bool moert_selector_use_prediction(moert_selector *s, int ranks_per_node, bool training, moert_status *st);
/* The variant of layer li for a step whose padded capacity is C (an
 * executor's moert_pick_fn). */
int moert_selector_pick(void *s, int li, int64_t capacity, int64_t step);
/* Records layer li's time (ms, already max-reduced over ranks) for the
 * variant it ran at capacity C. Returns true when this finished exploring
 * the layer's bucket (the table is then worth reporting). */
bool moert_selector_record(moert_selector *s, int li, int64_t capacity, int variant, double ms);
/* Writes `"LAYER": {"bucket": B, "chosen": "...", "ms": {"VARIANT": mean, ...}}`
 * for layer li's bucket of capacity C. */
void moert_selector_json(const moert_selector *s, int li, int64_t capacity, FILE *out);

#endif
