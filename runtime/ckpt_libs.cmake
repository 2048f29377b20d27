# The checkpoint code's two libraries from the distribution (runtime/checkpoint.h):
#   libxxhash (Debian: libxxhash-dev)  XXH64, the hash of every checkpoint file
#   jansson   (Debian: libjansson-dev) the JSON of safetensors headers and of
#                                      MANIFEST.json (64-bit integers; >= 2.11
#                                      for json_error_code)
# Found with find_path/find_library, so CMAKE_PREFIX_PATH (the variable or the
# environment's) points at a copy outside the system, as on a machine without a
# package manager; CPATH and LIBRARY_PATH are honoured too, as the compiler does.
# Defines the imported targets moert::xxhash and moert::jansson;
# MOERT_CKPT_LINK_LIBS, their library files for the link line of the binaries
# `moec build` makes (runtime/moert.cmake); and MOERT_CKPT_SOURCES, the
# checkpoint code that libmoert and moert_core compile.
set(MOERT_CKPT_SOURCES ckpt_json.c ckpt_file.c ckpt_safetensors.c ckpt_manifest.c ckpt_dir.c)
string(REPLACE ":" ";" _ckpt_cpath "$ENV{CPATH}")
string(REPLACE ":" ";" _ckpt_libpath "$ENV{LIBRARY_PATH}")

foreach(lib "xxhash;xxhash.h;libxxhash-dev" "jansson;jansson.h;libjansson-dev")
  list(GET lib 0 name)
  list(GET lib 1 header)
  list(GET lib 2 package)
  string(TOUPPER ${name} NAME)
  find_path(MOEC_${NAME}_INCLUDE ${header} HINTS ${_ckpt_cpath})
  find_library(MOEC_${NAME}_LIB ${name} HINTS ${_ckpt_libpath})
  if(NOT MOEC_${NAME}_INCLUDE OR NOT MOEC_${NAME}_LIB)
    message(FATAL_ERROR
      "${name} not found (${header}: ${MOEC_${NAME}_INCLUDE}; lib${name}: ${MOEC_${NAME}_LIB}). "
      "The checkpoint code needs it: install the Debian package ${package} "
      "(apt-get install ${package}; `make` runs tools/install-deps.sh, which does), "
      "or point CMAKE_PREFIX_PATH at a copy.")
  endif()
  add_library(moert::${name} UNKNOWN IMPORTED)
  set_target_properties(moert::${name} PROPERTIES
    IMPORTED_LOCATION ${MOEC_${NAME}_LIB}
    INTERFACE_INCLUDE_DIRECTORIES ${MOEC_${NAME}_INCLUDE})
  message(STATUS "checkpoints: ${name} (${MOEC_${NAME}_LIB}, ${MOEC_${NAME}_INCLUDE}/${header})")
endforeach()

file(STRINGS ${MOEC_JANSSON_INCLUDE}/jansson.h _jansson_minor REGEX "#define JANSSON_MINOR_VERSION")
string(REGEX REPLACE ".*VERSION +([0-9]+).*" "\\1" _jansson_minor "${_jansson_minor}")
if(_jansson_minor LESS 11)
  message(FATAL_ERROR "jansson 2.${_jansson_minor} in ${MOEC_JANSSON_INCLUDE} is too old: the "
                      "checkpoint code needs 2.11 or later (Debian: libjansson-dev)")
endif()

set(MOERT_CKPT_LINK_LIBS ${MOEC_XXHASH_LIB} ${MOEC_JANSSON_LIB})
