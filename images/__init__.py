"""Image builds: base images (build-tiny.sh, manifest.py) and warm layers (warm.py); the manifest format they
write, which the gateway checks images against, is jobspecs/manifest.py."""
