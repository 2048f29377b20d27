/* ckpt_safetensors.c — the safetensors format (checkpoint.h describes it): the
 * writer, which validates what it is given and lays the header out byte for byte
 * as moec always has, and the reader, which takes hostile bytes. jansson parses the
 * header (refusing duplicate keys); on its tree this file checks everything the
 * format needs: the length field, each entry's fields and their types, dtypes,
 * shapes, that each tensor's span is what its shape needs, and that the spans
 * tile the data exactly, no gap, no overlap, nothing past the end. Every failure
 * names the file, the tensor and what is wrong. jansson builds the whole tree
 * before these checks: a hostile header of small values (`[0,0,...]`) costs up to
 * about 20 times its size in memory, so MOERT_ST_MAX_HEADER bounds that too. */
#define _POSIX_C_SOURCE 200809L
#include "ckpt_impl.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ======================================================================== */
/* dtypes, shapes and the writer                                            */
/* ======================================================================== */

static const struct {
  const char *name;
  size_t size;
} dtypes[MOERT_ST_NDTYPES] = {
    [MOERT_ST_F64] = {"F64", 8},   [MOERT_ST_F32] = {"F32", 4}, [MOERT_ST_F16] = {"F16", 2},
    [MOERT_ST_BF16] = {"BF16", 2}, [MOERT_ST_I64] = {"I64", 8}, [MOERT_ST_I32] = {"I32", 4},
    [MOERT_ST_I16] = {"I16", 2},   [MOERT_ST_I8] = {"I8", 1},   [MOERT_ST_U64] = {"U64", 8},
    [MOERT_ST_U32] = {"U32", 4},   [MOERT_ST_U16] = {"U16", 2}, [MOERT_ST_U8] = {"U8", 1},
    [MOERT_ST_BOOL] = {"BOOL", 1},
};

const char *moert_st_dtype_name(moert_st_dtype dt) {
  return (unsigned)dt < MOERT_ST_NDTYPES ? dtypes[dt].name : "?";
}

size_t moert_st_dtype_size(moert_st_dtype dt) {
  return (unsigned)dt < MOERT_ST_NDTYPES ? dtypes[dt].size : 0;
}

/* "[4, 5]" */
static void fmt_shape(char *buf, size_t cap, const int64_t *shape, int ndim) {
  size_t o = (size_t)snprintf(buf, cap, "[");
  for (int i = 0; i < ndim && o < cap; i++)
    o += (size_t)snprintf(buf + o, cap - o, "%s%" PRId64, i ? ", " : "", shape[i]);
  if (o < cap) snprintf(buf + o, cap - o, "]");
}

/* Bytes a tensor of this shape and dtype needs; false if that overflows. */
static bool shape_bytes(const int64_t *shape, int ndim, moert_st_dtype dt, uint64_t *out) {
  uint64_t n = moert_st_dtype_size(dt);
  bool zero = false, over = false;
  for (int i = 0; i < ndim; i++) {
    uint64_t d = (uint64_t)shape[i];
    if (d == 0)
      zero = true;
    else if (n > UINT64_MAX / d)
      over = true;
    else
      n *= d;
  }
  if (zero) n = 0;
  *out = n;
  return zero || !over;
}

bool moert_st_header(const moert_st_tensor *t, int n, const moert_kv *meta, int nmeta,
                     moert_sbuf *hdr, moert_status *st) {
  if (n < 0 || nmeta < 0 || (n > 0 && !t) || (nmeta > 0 && !meta))
    return MOERT_FAIL(st, "cannot write safetensors: invalid tensor or metadata count (%d, %d)", n,
                      nmeta);
  const char **names = malloc(sizeof *names * (size_t)(n > nmeta ? n : nmeta) + 1);
  if (!names) return MOERT_FAIL(st, "cannot write safetensors: out of memory");
  bool ok = false;
  const char *format = "pt";
  for (int i = 0; i < nmeta; i++) {
    if (!meta[i].key || !meta[i].value || !moert_ckpt_utf8_valid(meta[i].key) ||
        !moert_ckpt_utf8_valid(meta[i].value)) {
      MOERT_FAIL(st, "cannot write safetensors: metadata entry %d is NULL or not UTF-8", i);
      goto done;
    }
    names[i] = meta[i].key;
  }
  const char *dup = moert_ckpt_find_duplicate(names, nmeta);
  if (dup) {
    MOERT_FAIL(st, "cannot write safetensors: metadata key `%s` given twice",
               moert_ckpt_show(dup).s);
    goto done;
  }
  for (int i = 0; i < n; i++) {
    const moert_st_tensor *x = &t[i];
    if (!x->name || !x->name[0] || !moert_ckpt_utf8_valid(x->name) ||
        strcmp(x->name, "__metadata__") == 0) {
      MOERT_FAIL(st,
                 "cannot write safetensors: tensor %d has no name, a name that is not UTF-8, "
                 "or the reserved name `__metadata__`",
                 i);
      goto done;
    }
    if ((unsigned)x->dtype >= MOERT_ST_NDTYPES) {
      MOERT_FAIL(st, "cannot write safetensors: tensor `%s` has an invalid dtype (%d)",
                 moert_ckpt_show(x->name).s, (int)x->dtype);
      goto done;
    }
    if (x->ndim < 0 || x->ndim > MOERT_ST_MAX_DIMS) {
      MOERT_FAIL(st, "cannot write safetensors: tensor `%s` has %d dimensions (limit is %d)",
                 moert_ckpt_show(x->name).s, x->ndim, MOERT_ST_MAX_DIMS);
      goto done;
    }
    for (int d = 0; d < x->ndim; d++)
      if (x->shape[d] < 0) {
        MOERT_FAIL(st, "cannot write safetensors: tensor `%s` has a negative dimension %" PRId64,
                   moert_ckpt_show(x->name).s, x->shape[d]);
        goto done;
      }
    uint64_t need;
    char shp[160];
    fmt_shape(shp, sizeof shp, x->shape, x->ndim);
    if (!shape_bytes(x->shape, x->ndim, x->dtype, &need) || need != x->nbytes) {
      MOERT_FAIL(st,
                 "cannot write safetensors: tensor `%s` has %zu bytes of data but its shape %s of "
                 "%s needs %" PRIu64,
                 moert_ckpt_show(x->name).s, x->nbytes, shp, moert_st_dtype_name(x->dtype), need);
      goto done;
    }
    if (x->nbytes > 0 && !x->data) {
      MOERT_FAIL(st, "cannot write safetensors: tensor `%s` has no data",
                 moert_ckpt_show(x->name).s);
      goto done;
    }
    names[i] = x->name;
  }
  dup = moert_ckpt_find_duplicate(names, n);
  if (dup) {
    MOERT_FAIL(st, "cannot write safetensors: two tensors are called `%s`", moert_ckpt_show(dup).s);
    goto done;
  }
  for (int i = 0; i < nmeta; i++)
    if (strcmp(meta[i].key, "format") == 0) format = meta[i].value;

  moert_sb_puts(hdr, "{\"__metadata__\":{\"format\":");
  moert_sb_json_str(hdr, format);
  for (int i = 0; i < nmeta; i++) {
    if (strcmp(meta[i].key, "format") == 0) continue;
    moert_sb_putn(hdr, ",", 1);
    moert_sb_json_str(hdr, meta[i].key);
    moert_sb_putn(hdr, ":", 1);
    moert_sb_json_str(hdr, meta[i].value);
  }
  moert_sb_putn(hdr, "}", 1);
  uint64_t off = 0;
  for (int i = 0; i < n; i++) {
    moert_sb_putn(hdr, ",", 1);
    moert_sb_json_str(hdr, t[i].name);
    moert_sb_printf(hdr, ":{\"dtype\":\"%s\",\"shape\":[", moert_st_dtype_name(t[i].dtype));
    for (int d = 0; d < t[i].ndim; d++)
      moert_sb_printf(hdr, d ? ",%" PRId64 : "%" PRId64, t[i].shape[d]);
    moert_sb_printf(hdr, "],\"data_offsets\":[%" PRIu64 ",%" PRIu64 "]}", off, off + t[i].nbytes);
    off += t[i].nbytes;
  }
  moert_sb_putn(hdr, "}", 1);
  while (!hdr->oom && hdr->len % 8 != 0) moert_sb_putn(hdr, " ", 1);
  if (hdr->oom) {
    MOERT_FAIL(st, "cannot write safetensors: out of memory building the header");
    goto done;
  }
  if (hdr->len > MOERT_ST_MAX_HEADER) {
    MOERT_FAIL(st, "cannot write safetensors: the header would be %zu bytes (limit is %u)",
               hdr->len, MOERT_ST_MAX_HEADER);
    goto done;
  }
  ok = true;
done:
  free(names);
  return ok;
}

bool moert_st_serialize(const moert_st_tensor *tensors, int n, const moert_kv *meta, int nmeta,
                        void **out, size_t *out_len, moert_status *st) {
  moert_sbuf hdr = {0};
  if (!moert_st_header(tensors, n, meta, nmeta, &hdr, st)) {
    free(hdr.p);
    return MOERT_UP(st);
  }
  size_t total = 8 + hdr.len;
  for (int i = 0; i < n; i++) {
    if (tensors[i].nbytes > SIZE_MAX - total) {
      free(hdr.p);
      return MOERT_FAIL(st, "cannot write safetensors: the tensors do not fit in memory");
    }
    total += tensors[i].nbytes;
  }
  unsigned char *buf = malloc(total);
  if (!buf) {
    free(hdr.p);
    return MOERT_FAIL(st, "cannot write safetensors: out of memory for %zu bytes", total);
  }
  moert_ckpt_store_le64(buf, hdr.len);
  memcpy(buf + 8, hdr.p, hdr.len);
  size_t o = 8 + hdr.len;
  for (int i = 0; i < n; i++) {
    if (tensors[i].nbytes) memcpy(buf + o, tensors[i].data, tensors[i].nbytes);
    o += tensors[i].nbytes;
  }
  free(hdr.p);
  *out = buf;
  *out_len = total;
  return true;
}

/* ======================================================================== */
/* The reader                                                               */
/* ======================================================================== */

struct moert_st_file {
  unsigned char *buf; /* the whole file, owned */
  size_t len;
  json_t *header;     /* the parsed header; names and metadata point into it */
  moert_st_tensor *t; /* in data order */
  int n;
  const moert_st_tensor **by_name; /* sorted by name, for find */
  moert_kv *meta;                  /* in file order */
  int nmeta;
};

/* One tensor entry as parsed, before the offsets are checked together. */
typedef struct st_entry {
  uint64_t begin, end;
  int index; /* in header order */
} st_entry;

static int cmp_entry(const void *a, const void *b) {
  const st_entry *x = a, *y = b;
  if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
  if (x->end != y->end) return x->end < y->end ? -1 : 1;
  return x->index - y->index;
}

static int cmp_tensor_name(const void *a, const void *b) {
  return strcmp((*(const moert_st_tensor *const *)a)->name,
                (*(const moert_st_tensor *const *)b)->name);
}

/* The array v of field `field` of tensor `name`: at most max non-negative integers
 * into vals, their count in *count. `what` is "ORIGIN: header". */
static bool st_uint_array(const json_t *v, const char *what, const char *name, const char *field,
                          uint64_t *vals, int max, int *count, moert_status *st) {
  if (!json_is_array(v))
    return MOERT_FAIL(st, "%s: tensor `%s`: %s must be an array, found %s", what,
                      moert_ckpt_show(name).s, field, moert_ckpt_json_kind(v));
  if (json_array_size(v) > (size_t)max)
    return MOERT_FAIL(st, "%s: tensor `%s`: %s has more than %d entries", what,
                      moert_ckpt_show(name).s, field, max);
  size_t i;
  const json_t *x;
  json_array_foreach(v, i, x) {
    if (!json_is_number(x))
      return MOERT_FAIL(st, "%s: tensor `%s`: %s must hold non-negative integers, found %s", what,
                        moert_ckpt_show(name).s, field, moert_ckpt_json_kind(x));
    if (!json_is_integer(x) || json_integer_value(x) < 0) {
      char num[64];
      moert_ckpt_json_num(x, num, sizeof num);
      return MOERT_FAIL(
          st, "%s: tensor `%s`: %s must hold non-negative integers below 2^63, found `%s`", what,
          moert_ckpt_show(name).s, field, num);
    }
    vals[i] = (uint64_t)json_integer_value(x);
  }
  *count = (int)json_array_size(v);
  return true;
}

static bool st_dtype_of(const char *s, moert_st_dtype *out) {
  for (int i = 0; i < MOERT_ST_NDTYPES; i++)
    if (strcmp(s, dtypes[i].name) == 0) {
      *out = (moert_st_dtype)i;
      return true;
    }
  return false;
}

/* The object v describing tensor `name`: its dtype, shape and data_offsets. */
static bool st_tensor_entry(const json_t *v, const char *what, const char *name, moert_st_tensor *t,
                            st_entry *e, moert_status *st) {
  moert_ckpt_shown shown = moert_ckpt_show(name); /* lives as long as nm */
  const char *nm = shown.s;
  if (!json_is_object(v))
    return MOERT_FAIL(st, "%s: tensor `%s` must be described by an object, found %s", what, nm,
                      moert_ckpt_json_kind(v));
  const char *key;
  const json_t *x;
  json_object_foreach((json_t *)v, key, x) {
    if (strcmp(key, "dtype") != 0 && strcmp(key, "shape") != 0 && strcmp(key, "data_offsets") != 0)
      return MOERT_FAIL(st,
                        "%s: tensor `%s` has unknown field `%s` (expected dtype, shape, "
                        "data_offsets)",
                        what, nm, moert_ckpt_show(key).s);
  }
  const json_t *dtype = json_object_get(v, "dtype"), *shape = json_object_get(v, "shape"),
               *offsets = json_object_get(v, "data_offsets");
  const char *missing = !dtype ? "dtype" : !shape ? "shape" : !offsets ? "data_offsets" : NULL;
  if (missing) return MOERT_FAIL(st, "%s: tensor `%s` has no `%s`", what, nm, missing);
  if (!json_is_string(dtype))
    return MOERT_FAIL(st, "%s: tensor `%s`: dtype must be a string, found %s", what, nm,
                      moert_ckpt_json_kind(dtype));
  if (!st_dtype_of(json_string_value(dtype), &t->dtype))
    return MOERT_FAIL(st,
                      "%s: tensor `%s` has unknown dtype `%s` (moec reads F64, F32, F16, BF16, "
                      "I64, I32, I16, I8, U64, U32, U16, U8, BOOL)",
                      what, nm, moert_ckpt_show(json_string_value(dtype)).s);
  uint64_t dims[MOERT_ST_MAX_DIMS];
  MOERT_TRY(st, st_uint_array(shape, what, name, "shape", dims, MOERT_ST_MAX_DIMS, &t->ndim, st));
  for (int i = 0; i < t->ndim; i++) t->shape[i] = (int64_t)dims[i];
  uint64_t off[2];
  int k = 0;
  MOERT_TRY(st, st_uint_array(offsets, what, name, "data_offsets", off, 2, &k, st));
  if (k != 2)
    return MOERT_FAIL(st, "%s: tensor `%s`: data_offsets must be [begin, end], found %d entr%s",
                      what, nm, k, k == 1 ? "y" : "ies");
  e->begin = off[0];
  e->end = off[1];
  return true;
}

/* __metadata__: null, or an object of strings, appended to f->meta. */
static bool st_metadata(const json_t *v, const char *what, moert_st_file *f, moert_status *st) {
  if (json_is_null(v)) return true;
  if (!json_is_object(v))
    return MOERT_FAIL(st, "%s: __metadata__ must be an object of strings, found %s", what,
                      moert_ckpt_json_kind(v));
  f->meta = malloc(sizeof *f->meta * json_object_size(v) + 1);
  if (!f->meta) return MOERT_FAIL(st, "%s: out of memory", what);
  const char *key;
  const json_t *x;
  json_object_foreach((json_t *)v, key, x) {
    if (!json_is_string(x))
      return MOERT_FAIL(st, "%s: __metadata__ value for `%s` must be a string, found %s", what,
                        moert_ckpt_show(key).s, moert_ckpt_json_kind(x));
    f->meta[f->nmeta++] = (moert_kv){key, json_string_value(x)};
  }
  return true;
}

/* A key twice in one object of the header, said for what it is there. */
static bool st_duplicate(const moert_json_dup *d, const char *origin, const char *what,
                         moert_status *st) {
  moert_ckpt_shown shown = moert_ckpt_show(moert_json_dup_text(d->key));
  const char *key = shown.s, *outer = moert_json_dup_text(d->outer);
  if (d->depth == 1 && strcmp(moert_json_dup_text(d->key), "__metadata__") == 0)
    return MOERT_FAIL(st, "%s: __metadata__ appears twice", what);
  if (d->depth == 1)
    return MOERT_FAIL(st, "%s: tensor `%s` appears twice in the header", origin, key);
  if (d->depth == 2 && strcmp(outer, "__metadata__") == 0)
    return MOERT_FAIL(st, "%s: __metadata__ has the key `%s` twice", origin, key);
  if (d->depth == 2)
    return MOERT_FAIL(st, "%s: tensor `%s` has `%s` twice", what, moert_ckpt_show(outer).s, key);
  return MOERT_FAIL(st, "%s: the key `%s` appears twice in one object (at byte %zu)", what, key,
                    d->at);
}

/* Each tensor on its own: begin <= end, the span its shape needs, inside the data;
 * then together: sorted by offset (ev is sorted), they tile [0, data_len) exactly. */
static bool st_check_offsets(const moert_st_tensor *tv, st_entry *ev, int n, uint64_t data_len,
                             const char *origin, moert_status *st) {
  for (int i = 0; i < n; i++) {
    const moert_st_tensor *t = &tv[i];
    moert_ckpt_shown shown = moert_ckpt_show(t->name);
    const char *nm = shown.s;
    char shp[160];
    uint64_t need;
    if (ev[i].begin > ev[i].end)
      return MOERT_FAIL(st,
                        "%s: tensor `%s` has data_offsets [%" PRIu64 ", %" PRIu64
                        "]: the end is before the beginning",
                        origin, nm, ev[i].begin, ev[i].end);
    fmt_shape(shp, sizeof shp, t->shape, t->ndim);
    if (!shape_bytes(t->shape, t->ndim, t->dtype, &need))
      return MOERT_FAIL(st, "%s: tensor `%s` has shape %s of %s, which is too large", origin, nm,
                        shp, moert_st_dtype_name(t->dtype));
    if (need != ev[i].end - ev[i].begin)
      return MOERT_FAIL(st,
                        "%s: tensor `%s` has data_offsets [%" PRIu64 ", %" PRIu64
                        "] but its shape %s of %s needs %" PRIu64 " bytes",
                        origin, nm, ev[i].begin, ev[i].end, shp, moert_st_dtype_name(t->dtype),
                        need);
    if (ev[i].end > data_len)
      return MOERT_FAIL(st,
                        "%s: tensor `%s` has data_offsets [%" PRIu64 ", %" PRIu64
                        "] but the file holds only %" PRIu64 " bytes of tensor data (truncated?)",
                        origin, nm, ev[i].begin, ev[i].end, data_len);
  }
  if (n > 0) qsort(ev, (size_t)n, sizeof *ev, cmp_entry);
  uint64_t at = 0;
  for (int i = 0; i < n; i++) {
    const char *name = tv[ev[i].index].name;
    if (ev[i].begin > at) {
      if (i == 0)
        return MOERT_FAIL(st,
                          "%s: bytes [0, %" PRIu64
                          ") of the tensor data belong to no tensor (the first, `%s`, starts at "
                          "%" PRIu64 ")",
                          origin, ev[i].begin, moert_ckpt_show(name).s, ev[i].begin);
      return MOERT_FAIL(st,
                        "%s: bytes [%" PRIu64 ", %" PRIu64
                        ") of the tensor data, between tensors `%s` and `%s`, belong to no tensor",
                        origin, at, ev[i].begin, moert_ckpt_show(tv[ev[i - 1].index].name).s,
                        moert_ckpt_show(name).s);
    }
    if (ev[i].begin < at) {
      const st_entry *q = &ev[i - 1];
      return MOERT_FAIL(st,
                        "%s: tensors `%s` [%" PRIu64 ", %" PRIu64 "] and `%s` [%" PRIu64
                        ", %" PRIu64 "] overlap",
                        origin, moert_ckpt_show(tv[q->index].name).s, q->begin, q->end,
                        moert_ckpt_show(name).s, ev[i].begin, ev[i].end);
    }
    at = ev[i].end;
  }
  if (at != data_len)
    return MOERT_FAIL(st,
                      "%s: the last %" PRIu64
                      " bytes of the file belong to no tensor (the tensors cover %" PRIu64
                      " of %" PRIu64 " bytes of data)",
                      origin, data_len - at, at, data_len);
  return true;
}

void moert_st_destroy(moert_st_file *f) {
  if (!f) return;
  free(f->buf);
  json_decref(f->header);
  free(f->t);
  free(f->by_name);
  free(f->meta);
  free(f);
}

/* Parses f->buf[0..f->len); fills the rest of f. */
static bool st_parse(moert_st_file *f, const char *origin, moert_status *st) {
  char what[512];
  if (f->len < 8)
    return MOERT_FAIL(st,
                      "%s: %zu bytes is too short for a safetensors file (it starts with an 8-byte "
                      "header length)",
                      origin, f->len);
  uint64_t hlen = moert_ckpt_load_le64(f->buf);
  if (hlen > MOERT_ST_MAX_HEADER)
    return MOERT_FAIL(st,
                      "%s: header length %" PRIu64
                      " is absurd (limit is %u bytes): not a safetensors "
                      "file, or a damaged one",
                      origin, hlen, MOERT_ST_MAX_HEADER);
  if (hlen > f->len - 8)
    return MOERT_FAIL(st,
                      "%s: header length %" PRIu64
                      " runs past the end of the file (%zu bytes follow "
                      "the length field): the file is truncated or not safetensors",
                      origin, hlen, f->len - 8);
  const unsigned char *text = f->buf + 8, *data = f->buf + 8 + hlen;
  uint64_t data_len = f->len - 8 - hlen;
  snprintf(what, sizeof what, "%s: header", origin);

  size_t ws = 0;
  while (ws < hlen && (text[ws] == ' ' || text[ws] == '\t' || text[ws] == '\n' || text[ws] == '\r'))
    ws++;
  if (ws == hlen)
    return MOERT_FAIL(st, "%s: the header is empty (it must be a JSON object)", origin);
  moert_json_dup dup = {0};
  f->header = moert_ckpt_json_load(text, (size_t)hlen, what, &dup, st);
  if (!f->header) {
    if (dup.key) {
      st_duplicate(&dup, origin, what, st);
      moert_json_dup_clear(&dup);
    }
    return MOERT_UP(st);
  }
  if (!json_is_object(f->header))
    return MOERT_FAIL(st, "%s: the header must be a JSON object, found %s", origin,
                      moert_ckpt_json_kind(f->header));

  size_t members = json_object_size(f->header);
  moert_st_tensor *tv = calloc(members + 1, sizeof *tv);
  st_entry *ev = calloc(members + 1, sizeof *ev);
  bool ok = false;
  int n = 0;
  if (!tv || !ev) {
    MOERT_FAIL(st, "%s: out of memory", what);
    goto done;
  }
  const char *key;
  const json_t *v;
  json_object_foreach(f->header, key, v) {
    if (strcmp(key, "__metadata__") == 0) {
      if (!st_metadata(v, what, f, st)) goto done;
      continue;
    }
    if (!key[0]) {
      MOERT_FAIL(st, "%s: a tensor has an empty name", what);
      goto done;
    }
    tv[n] = (moert_st_tensor){.name = key};
    ev[n] = (st_entry){.index = n};
    if (!st_tensor_entry(v, what, key, &tv[n], &ev[n], st)) goto done;
    n++;
  }
  if (!st_check_offsets(tv, ev, n, data_len, origin, st)) goto done;
  /* In data order, with their bytes; and by name for find (names are unique: the
   * header has no duplicate key). */
  f->t = malloc(sizeof *f->t * (size_t)n + 1);
  f->by_name = malloc(sizeof *f->by_name * (size_t)n + 1);
  if (!f->t || !f->by_name) {
    MOERT_FAIL(st, "%s: out of memory", origin);
    goto done;
  }
  for (int i = 0; i < n; i++) {
    f->t[i] = tv[ev[i].index];
    f->t[i].data = data + ev[i].begin;
    f->t[i].nbytes = (size_t)(ev[i].end - ev[i].begin);
    f->by_name[i] = &f->t[i];
  }
  if (n > 1) qsort(f->by_name, (size_t)n, sizeof *f->by_name, cmp_tensor_name);
  f->n = n;
  ok = true;
done:
  free(tv);
  free(ev);
  return ok ? true : MOERT_UP(st);
}

bool moert_st_create_owned(unsigned char *buf, size_t len, const char *origin, moert_st_file **out,
                           moert_status *st) {
  moert_st_file *f = calloc(1, sizeof *f);
  if (!f) {
    free(buf);
    return MOERT_FAIL(st, "%s: out of memory", origin);
  }
  f->buf = buf;
  f->len = len;
  if (!st_parse(f, origin, st)) {
    moert_st_destroy(f);
    return MOERT_UP(st);
  }
  *out = f;
  return true;
}

bool moert_st_create(const void *buf, size_t len, const char *origin, moert_st_file **out,
                     moert_status *st) {
  if (!origin) origin = "safetensors data";
  unsigned char *copy = malloc(len ? len : 1);
  if (!copy) return MOERT_FAIL(st, "%s: out of memory for %zu bytes", origin, len);
  if (len) memcpy(copy, buf, len);
  MOERT_TRY(st, moert_st_create_owned(copy, len, origin, out, st));
  return true;
}

bool moert_st_create_from_path(const char *path, moert_st_file **out, moert_status *st) {
  unsigned char *buf;
  size_t len;
  MOERT_TRY(st, moert_ckpt_read_whole(path, UINT64_MAX, &buf, &len, st));
  MOERT_TRY(st, moert_st_create_owned(buf, len, path, out, st));
  return true;
}

int moert_st_count(const moert_st_file *f) { return f->n; }

const moert_st_tensor *moert_st_tensor_at(const moert_st_file *f, int i) {
  return i >= 0 && i < f->n ? &f->t[i] : NULL;
}

const moert_st_tensor *moert_st_find(const moert_st_file *f, const char *name) {
  if (!name || f->n == 0) return NULL;
  moert_st_tensor key = {.name = name};
  const moert_st_tensor *kp = &key;
  const moert_st_tensor **hit =
      bsearch(&kp, f->by_name, (size_t)f->n, sizeof *f->by_name, cmp_tensor_name);
  return hit ? *hit : NULL;
}

int moert_st_meta_count(const moert_st_file *f) { return f->nmeta; }

moert_kv moert_st_meta_at(const moert_st_file *f, int i) {
  moert_kv none = {NULL, NULL};
  return i >= 0 && i < f->nmeta ? f->meta[i] : none;
}

const char *moert_st_meta_get(const moert_st_file *f, const char *key) {
  for (int i = 0; i < f->nmeta; i++)
    if (strcmp(f->meta[i].key, key) == 0) return f->meta[i].value;
  return NULL;
}
