# copilot_here image with the secure proxy runtime built in (inactive by default:
# with no network.json, or rules disabled without a log, the container behaves as
# without it: no firewall, no proxy, no CA, no NET_ADMIN needed. A config that
# enables rules or the log, or a writable one, needs --cap-add=NET_ADMIN, plus
# NET_RAW on Podman).
#
#   docker build -t copilot-here-secure-proxy .          # node:20-bookworm-slim + Copilot CLI
#   ... --build-arg BASE_IMAGE=<any bookworm image>      # wrap an existing variant
#   ... --build-arg INSTALL_COPILOT=false                # without the Copilot CLI
#   ... --secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt   # behind a TLS-intercepting proxy
#
# The tag is the host CLI's default --image. The base must be Debian bookworm:
# python-iptables breaks with trixie's iptables 1.8.11. Needs BuildKit (RUN --mount);
# no `# syntax=` line, so no frontend image is pulled from Docker Hub. Podman needs
# `--format docker` to keep the HEALTHCHECK (OCI images have none): see image/build.sh.

ARG BASE_IMAGE=node:20-bookworm-slim

# ---------------------------------------------------------------------------- builder
# Wheels for everything: python-iptables compiles a C extension, so the compiler
# lives here and never reaches the final image.
FROM ${BASE_IMAGE} AS builder
ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      gcc libc6-dev python3-dev python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /build/venv

# Dependency layer: from image/runtime-requirements.txt alone (pinned, installed
# without their declared dependencies: mitmproxy's console, web UI, onboarding app and
# proxy authentication stacks stay out), so editing the source reuses it.
# pip_ca (optional secret): a CA bundle for pip behind an intercepting proxy.
WORKDIR /src
COPY image/runtime-requirements.txt image/slim.py ./
RUN --mount=type=secret,id=pip_ca \
    --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
 && /build/venv/bin/pip install -q --upgrade pip setuptools wheel \
 && /build/venv/bin/pip wheel --use-pep517 --no-deps --wheel-dir /wheels \
      -r runtime-requirements.txt "setuptools>=68" wheel pip

# The runtime venv with every dependency, at its final path (same base, so the same
# /usr/bin/python3): the final stage copies it, then the installer adds our code.
# Debug symbols go (zstandard, brotli and cryptography ship ~30 MB of them); pip
# and setuptools go (nothing installs into this venv at run time); so do the parts
# transparent mode never runs and all bytecode (slim.py trim; the final stage writes
# the bytecode of what the runtime imports).
RUN python3 -m venv /opt/secure-proxy/venv \
 && /opt/secure-proxy/venv/bin/pip install -q --no-cache-dir --no-compile --no-deps --no-index \
      --find-links /wheels -r runtime-requirements.txt \
 && /opt/secure-proxy/venv/bin/python -m pip uninstall -y -q pip setuptools \
 && python3 slim.py trim /opt/secure-proxy/venv \
 && find /opt/secure-proxy/venv -type f -name '*.so*' -exec strip --strip-unneeded {} +

# Our own wheel (pure Python), built offline from the wheels above.
COPY pyproject.toml README.md ./
COPY runtime ./runtime
COPY firewall ./firewall
COPY config ./config
COPY supervisor.d ./supervisor.d
RUN /build/venv/bin/pip wheel --no-deps --no-index --find-links /wheels \
      --wheel-dir /wheels . \
 && rm -rf build ./*.egg-info \
 && find /wheels /src -type f -print0 | sort -z | xargs -0 sha256sum > /build/inputs.sha256

# ---------------------------------------------------------------------------- final
FROM ${BASE_IMAGE}
ARG BASE_IMAGE
ARG INSTALL_COPILOT=true
ARG COPILOT_PACKAGE=@github/copilot
# ARG, not ENV: the user's shell in the container must not inherit it.
ARG DEBIAN_FRONTEND=noninteractive

# Run-time packages only: no compiler, no apt lists, no python3-venv (the venv comes
# ready from the builder; pip runs from its wheel at build time only). When this layer
# brings Python, it leaves out the standard library's bytecode (~12 MB, compiled by
# the package scripts): the installer below writes it for what the runtime imports.
RUN had_python=$(command -v python3 || true) \
 && apt-get update \
 && apt-get install -y --no-install-recommends iptables ipset python3 ca-certificates \
 && if [ -z "$had_python" ]; then \
      find /usr/lib/python3* -depth -name __pycache__ -type d -exec rm -rf {} +; \
    fi \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log

# The Copilot CLI, as copilot_here's base image has it (before the runtime, so a
# runtime change does not reinstall it). A base without npm skips it.
RUN --mount=type=secret,id=pip_ca \
    if [ "$INSTALL_COPILOT" != true ]; then \
      echo "INSTALL_COPILOT=$INSTALL_COPILOT: Copilot CLI not installed"; \
    elif ! command -v npm >/dev/null; then \
      echo "no npm in $BASE_IMAGE: Copilot CLI not installed"; \
    else \
      if [ -s /run/secrets/pip_ca ]; then export NODE_EXTRA_CA_CERTS=/run/secrets/pip_ca; fi; \
      npm install -g --no-fund --no-audit "$COPILOT_PACKAGE" \
      && npm cache clean --force && rm -rf /root/.npm /tmp/*; \
    fi

# Dependencies in their own layer (a source change reuses it).
COPY --from=builder /opt/secure-proxy/venv /opt/secure-proxy/venv

# Buildah (Podman 4.3) leaves RUN --mount=from=builder content out of the layer
# cache key: this digest of the builder's wheels and source is what makes a source
# change rerun the installer below (else a stale runtime would be reused).
COPY --from=builder /build/inputs.sha256 /opt/secure-proxy/build-inputs.sha256

# The one installer (runtime/install.py), the same the sandbox engine uses: our
# distribution into the copied venv (offline, without dependencies: they are all
# there, and mitmproxy's left-out ones must stay out; pip runs from the builder's pip
# wheel, so the venv gets no pip), config, supervisor files, proxy-user; then the
# bytecode of what the runtime imports (slim.py warm: proxy-user cannot write it at
# run time). Source and wheels are bind-mounted from the builder, so neither lands in
# a layer.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    --mount=type=bind,from=builder,source=/src,target=/src \
    cd /src \
 && PYTHONDONTWRITEBYTECODE=1 python3 -m runtime.install --root / --source /src --wheels /wheels \
      --no-deps \
 && cd / && /opt/secure-proxy/venv/bin/python -I /src/slim.py warm \
 && rm -rf /root/.cache /tmp/*

WORKDIR /work
# Healthy when no firewall of ours sends traffic anywhere (inactive: nothing to
# check), or when the interceptor it sends traffic to is listening. The firewall
# writes the first marker once its rules verified (and removes it when an edit
# switches rules off); the interceptor writes the second once it listens. The
# paths are runtime.paths.firewall_marker() and interceptor_marker() (the image
# test checks they agree).
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["sh", "-c", "test ! -e /run/secure-proxy/firewall.verified || test -f /run/secure-proxy/interceptor/interceptor.ready"]
ENTRYPOINT ["/usr/local/bin/secure-proxy-init"]
# No command given: init runs the Copilot CLI when installed, else bash.
CMD []

ARG VERSION=0.1.0
ARG VCS_REF=unknown
LABEL org.opencontainers.image.title="copilot_here secure proxy" \
      org.opencontainers.image.description="Coding-agent image with an egress guard: mitmproxy interceptor, iptables lock, network.json policy (inactive without config)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
