# libmoert: the runtime that every moec-built binary links (a static library,
# so a built model is one self-contained executable). The compiler links
# placement.c and status.c from here too (compiler/CMakeLists.txt).
add_library(moert STATIC
  status.c cpu_ops.c rng.c checkpoint.c placement.c backend_cpu.c comm_self.c comm_staged.c moe.c select.c trace.c
  data.c step.c ckpt_io.c driver.c comm_mpi.c)
target_include_directories(moert PUBLIC ${CMAKE_CURRENT_SOURCE_DIR})
target_link_libraries(moert PUBLIC m)
set(MOERT_LINK_LIBS "-lm")
if(MOEC_CBLAS AND CBLAS_INCLUDE AND OPENBLAS_LIB)
  target_include_directories(moert SYSTEM PRIVATE ${CBLAS_INCLUDE})
  target_compile_definitions(moert PRIVATE MOERT_HAVE_CBLAS)
  target_link_libraries(moert PUBLIC ${OPENBLAS_LIB})
  set(MOERT_LINK_LIBS "${OPENBLAS_LIB};-lm")
endif()
if(MOEC_SANITIZE)
  list(APPEND MOERT_LINK_LIBS "-fsanitize=address,undefined")
endif()
# comm_mpi.c: MPI's headers as SYSTEM (FindMPI's imported target), and its
# libraries for the binaries `moec build` links too (compiler/build.c).
find_package(MPI REQUIRED COMPONENTS C)
target_link_libraries(moert PUBLIC MPI::MPI_C)
list(APPEND MOERT_LINK_LIBS ${MPI_C_LINK_FLAGS} ${MPI_C_LIBRARIES})
set(MOERT_LINK_LIBS "${MOERT_LINK_LIBS}" PARENT_SCOPE)
set(MOERT_INCLUDE_DIR ${CMAKE_CURRENT_SOURCE_DIR} PARENT_SCOPE)

install(TARGETS moert ARCHIVE DESTINATION lib/moec)
install(FILES moert.h model.h DESTINATION include/moec)
