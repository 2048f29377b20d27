# moert_core: the counter-based generator (rng.c) and checkpoint files
# (checkpoint.h: safetensors, atomic checkpoint directories; the ckpt_*.c files
# of ckpt_libs.cmake, on libxxhash and jansson) as a small static library of
# their own, for their unit tests. status.c is compiled in too (no library
# holds status.c alone); a program that also links another archive with
# status.c takes one copy, as static linking pulls a member only once.
add_library(moert_core STATIC rng.c ${MOERT_CKPT_SOURCES} status.c)
target_include_directories(moert_core PUBLIC ${CMAKE_CURRENT_SOURCE_DIR})
target_link_libraries(moert_core PUBLIC m moert::xxhash moert::jansson)

# rng.h promises the same floats on every build: no FMA contraction in rng.c,
# in this library and in every other one that compiles it (libmoert).
if(CMAKE_C_COMPILER_ID MATCHES "GNU|Clang")
  set_property(SOURCE rng.c APPEND PROPERTY COMPILE_OPTIONS -ffp-contract=off)
endif()
