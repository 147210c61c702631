# virtcontainers — see README.md.
#
#   make build   host binaries + guest image (build/guest/)
#   make test    everything, including VM-booting integration tests
#   make bench   boot and footprint benchmark (numbers, not assertions)
#   make run     starts vcrid, the CRI server, on unix:///run/vcrid/vcrid.sock

CARGO        ?= cargo
GUEST_TARGET := x86_64-unknown-linux-gnu
AGENT_BIN    := target/guest/$(GUEST_TARGET)/release/vc-agent
GUEST_DIR    := build/guest

.PHONY: all deps build host guest test unit lint bench run demo clean

all: build

deps:
	@hack/install-deps.sh

host: deps
	$(CARGO) build --workspace --bins

# The agent is PID 1 of an initramfs with no libc: link it statically
# (glibc, crt-static), libseccomp included (without LIBSECCOMP_LINK_TYPE
# the binary links but crashes in its C start-up). Its own target dir keeps these flags from rebuilding
# the host artefacts.
guest: deps
	RUSTFLAGS="-C target-feature=+crt-static" CARGO_PROFILE_RELEASE_STRIP=symbols \
		LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu \
		$(CARGO) build --release -p vc-agent \
		--target $(GUEST_TARGET) --target-dir target/guest
	hack/build-guest.sh $(AGENT_BIN)

build: host guest

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) fmt --all -- --check

# Unit tests and integration tests (tests/ boots real VMs: root, QEMU).
test: build
	$(CARGO) test --workspace --no-fail-fast

bench: build
	hack/bench-boot.py
	$(CARGO) run --profile release-unwind -p tests --example bench_containers
	$(CARGO) build --profile release-unwind -p cri --bins
	$(CARGO) run --profile release-unwind -p tests --example bench_network
	$(CARGO) run --profile release-unwind -p tests --example bench_cri
	$(CARGO) run --profile release-unwind -p tests --example soak_cri
	$(CARGO) run --profile release-unwind -p tests --example bench_rootfs
	$(CARGO) run --profile release-unwind -p tests --example bench_sizing
	$(CARGO) run --profile release-unwind -p tests --example bench_exec
	$(CARGO) run --profile release-unwind -p tests --example bench_factory
	$(CARGO) run --profile release-unwind -p cri --example bench_authority
	VC_CONSOLE_FLOOD_MIB=200 $(CARGO) test -p tests --test cri_console_cap -- --nocapture

# vcrid with the defaults (or /etc/vcrid/config.toml): the guest image from
# build/guest, a default CNI bridge config written only when
# /etc/cni/net.d has none. Ctrl-C stops vcrid; pods keep running.
run: build
	target/debug/vcrid check || true
	exec target/debug/vcrid serve

demo: build
	hack/demo.sh

clean:
	rm -rf build target
