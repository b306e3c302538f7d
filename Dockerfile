# syntax=docker/dockerfile:1
# Tessera's container image: every binary in one small, non-root image.
#
#   docker build -t tessera:0.1.0 .
#
# The Helm chart (helm/tessera) runs each service from it with
# `--config /etc/tessera/config.toml`.

# ---- build ----------------------------------------------------------------
FROM rust:1.90-bookworm AS build
WORKDIR /src
# protox compiles the protos in Rust (no system protoc); ring and jemalloc
# (tikv-jemalloc-sys, the services' allocator: decision 25) need only the C
# compiler and make, which the rust image (buildpack-deps based) already has.
COPY . .
# Cache mounts keep the registry and target dir between builds; the binaries
# are copied out of the cache mount before the step ends, stripped of their
# symbols on the way (`install -s`: the release profile already leaves out
# debug info; stripping takes e.g. the gateway from 26.0 to 19.7 MB and the
# CLI from 41.0 to 31.7 MB, docs/PERFORMANCE.md).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
 && mkdir -p /out \
 && for b in keyserver storage-node watermark segmentation gateway tessera; do \
      install -s -m 0755 "target/release/$b" /out/; \
    done

# ---- runtime --------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
# ca-certificates: for an https:// OTLP collector signed by a public CA.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 tessera \
 && useradd --system --uid 10001 --gid tessera --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin tessera \
 && mkdir -p /data /secrets /etc/tessera /pki \
 && chown tessera:tessera /data /secrets
COPY --from=build /out/ /usr/local/bin/
USER 10001:10001
WORKDIR /data
# Every service: <binary> --config FILE; prints "listening=ADDR" once serving
# and exits 64 on a bad configuration.
CMD ["/usr/local/bin/tessera", "--help"]
