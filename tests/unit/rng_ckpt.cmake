# Unit tests of runtime/rng (Philox4x32-10: known answers, bulk == scalar at any
# offset, moments) and runtime/checkpoint (xxHash64 vectors, safetensors round
# trips and hostile headers, checkpoint directories and simulated crashes), and
# a cross-check of safetensors files with Python's `safetensors` package, which
# skips (exit 77) when python3, safetensors or numpy is missing.
add_executable(test_rng test_rng.c)
target_link_libraries(test_rng PRIVATE moert_core)
if(CMAKE_C_COMPILER_ID MATCHES "GNU|Clang")
  target_compile_options(test_rng PRIVATE -ffp-contract=off) # compares floats bit for bit
endif()
add_test(NAME unit.rng COMMAND test_rng)

add_executable(test_checkpoint test_checkpoint.c)
target_link_libraries(test_checkpoint PRIVATE moert_core)
add_test(NAME unit.checkpoint
         COMMAND test_checkpoint ${CMAKE_CURRENT_BINARY_DIR}/checkpoint-scratch)

find_program(MOEC_PYTHON3 python3)
if(MOEC_PYTHON3)
  add_test(NAME unit.safetensors_python
           COMMAND ${MOEC_PYTHON3} ${CMAKE_CURRENT_SOURCE_DIR}/check_safetensors.py
                   $<TARGET_FILE:test_checkpoint> ${CMAKE_CURRENT_BINARY_DIR}/safetensors-crosscheck)
else()
  add_test(NAME unit.safetensors_python
           COMMAND sh -c "echo 'SKIP: no python3; the safetensors cross-check needs python3 with safetensors and numpy'; exit 77")
endif()
set_tests_properties(unit.safetensors_python PROPERTIES SKIP_RETURN_CODE 77)
