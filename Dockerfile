# syntax=docker/dockerfile:1
# Both binaries in one build; one small non-root runtime image each:
#   docker build --target airouter          -t ghcr.io/airouter/airouter:0.1.0 .
#   docker build --target airouter-operator -t ghcr.io/airouter/airouter-operator:0.1.0 .
# TLS is rustls (no OpenSSL); the binaries only need glibc, which distroless/cc provides.

FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p airouter -p airouter-operator \
    && mkdir -p /out \
    && cp target/release/airouter target/release/airouter-operator /out/

FROM gcr.io/distroless/cc-debian12:nonroot AS airouter
COPY --from=build /out/airouter /usr/local/bin/airouter
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/airouter"]
CMD ["run", "--config", "/etc/airouter/config.yaml"]

FROM gcr.io/distroless/cc-debian12:nonroot AS airouter-operator
COPY --from=build /out/airouter-operator /usr/local/bin/airouter-operator
USER 65532:65532
EXPOSE 8081
ENTRYPOINT ["/usr/local/bin/airouter-operator"]
CMD ["run"]
