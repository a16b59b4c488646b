# Ascend image: not built yet (see the Delivery issue). This file is a
# placeholder on purpose; it does not pretend to build anything.
FROM scratch
LABEL org.opencontainers.image.title="vllm-ascend-ext (placeholder)"
