/* fake_image.h — the "cubin" of the emulated NVRTC (fake_nvrtc.c), which the
 * emulated driver (fake_cuda.c) loads: 8 magic bytes, the length of what
 * follows (8 bytes, little-endian), then a shared object built from the CUDA
 * source with emu_device.h. A real cubin or PTX is refused by the driver. */
#ifndef MOEC_EMU_IMAGE_H
#define MOEC_EMU_IMAGE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define MOEC_EMU_IMAGE_MAGIC "MOECEMU1"
enum { MOEC_EMU_IMAGE_HEAD = 16 };

static inline void moec_emu_image_head(unsigned char *out, size_t n) {
  memcpy(out, MOEC_EMU_IMAGE_MAGIC, 8);
  for (int i = 0; i < 8; i++) out[8 + i] = (unsigned char)((uint64_t)n >> (8 * i));
}

/* The shared object's length, or 0 when image is not one of ours. */
static inline size_t moec_emu_image_size(const unsigned char *image) {
  if (memcmp(image, MOEC_EMU_IMAGE_MAGIC, 8) != 0) return 0;
  uint64_t n = 0;
  for (int i = 0; i < 8; i++) n |= (uint64_t)image[8 + i] << (8 * i);
  return (size_t)n;
}

#endif
