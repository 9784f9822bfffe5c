# The epic-export image: the operator (`controller`), the export Jobs (`job`), the sandbox and the CLI.
#   docker build -t registry.example.org/epic-export:0.1.0 .
# The binary links glibc dynamically, so the runtime image is distroless `cc` (glibc, libgcc, CA
# certificates for TLS to Epic) of the same Debian release as the builder. Time zones are built into
# the binary. It runs as the distroless `nonroot` user (65532), as the chart and the export Jobs expect.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin epic-export \
    && cp target/release/epic-export /epic-export

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /epic-export /epic-export
USER 65532:65532
ENTRYPOINT ["/epic-export"]
