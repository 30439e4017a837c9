#!/usr/bin/env bash
# Create .env from .env.example on first use, with fresh random secrets. Never overwrites an existing .env.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .env ] && exit 0
rand() { python3 -c 'import secrets; print(secrets.token_urlsafe(32).replace("-", "x").replace("_", "y"))'; }
pg=$(rand); rd=$(rand); jwt=$(rand)$(rand)
umask 077
sed -e "s|postgresql://vmgate:CHANGE_ME@|postgresql://vmgate:${pg}@|" \
    -e "s|redis://:CHANGE_ME@|redis://:${rd}@|" \
    -e "s|^JWT_SECRET=.*|JWT_SECRET=${jwt}|" .env.example > .env
echo "wrote .env with fresh secrets"
