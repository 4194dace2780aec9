# Sourced by the other scripts: where things live.
# Builds go to a cache outside the clone so that CI and repeated clones reuse
# RocksDB and libtorch objects; libtorch is reached through a stable symlink
# to the project's virtualenv, so moving the clone does not force a rebuild.
MESHTRAIN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MESHTRAIN_CACHE="${MESHTRAIN_CACHE:-$HOME/.cache/meshtrain}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$MESHTRAIN_CACHE/target}"
export LIBTORCH="$MESHTRAIN_CACHE/libtorch"
export LD_LIBRARY_PATH="$LIBTORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MESHTRAIN_BIN="$CARGO_TARGET_DIR/release/meshtrain"
unset LIBTORCH_USE_PYTORCH
