# Thin wrapper around CMake (as Neovim's): configure once, then forward.
#   make            build everything into build/
#   make test       build, then run the CTest suite
#   make demo       build, then run the demo (examples/ through moec)
#   make mutate     the mutation score: deliberate bugs (tools/mutations.txt) the
#                   tests must catch, each built and tested in a scratch copy of
#                   the tree (tools/mutate.py); MUTATIONS=a,b runs only those,
#                   MUTATE_DIR=DIR keeps the scratch copy there for the next run
#   make install PREFIX=/usr/local
#   make clean      remove build/
# Missing system packages are installed first (tools/install-deps.sh).

BUILD_DIR   ?= build
BUILD_TYPE  ?= RelWithDebInfo
PREFIX      ?= /usr/local
CMAKE_FLAGS ?=
MUTATIONS   ?=
MUTATE_DIR  ?=
CTEST_FLAGS ?= --output-on-failure -j $(shell nproc 2>/dev/null || echo 2)
GENERATOR   := $(shell command -v ninja >/dev/null 2>&1 && echo Ninja || echo "Unix Makefiles")

all: build

deps:
	@sh tools/install-deps.sh

$(BUILD_DIR)/.configured: CMakeLists.txt | deps
	cmake -S . -B $(BUILD_DIR) -G "$(GENERATOR)" -DCMAKE_BUILD_TYPE=$(BUILD_TYPE) \
	  -DCMAKE_INSTALL_PREFIX=$(PREFIX) $(CMAKE_FLAGS)
	@touch $@

build: deps $(BUILD_DIR)/.configured
	cmake --build $(BUILD_DIR)

test: build
	cd $(BUILD_DIR) && ctest $(CTEST_FLAGS)

demo: build
	cmake --build $(BUILD_DIR) --target demo

mutate: deps
	python3 tools/mutate.py $(if $(MUTATIONS),--only '$(MUTATIONS)') $(if $(MUTATE_DIR),--dir '$(MUTATE_DIR)')

install: build
	cmake --install $(BUILD_DIR) --prefix $(PREFIX)

clean:
	rm -rf $(BUILD_DIR)

.PHONY: all deps build test demo mutate install clean
