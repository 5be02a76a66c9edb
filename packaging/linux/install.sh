#!/usr/bin/env bash
# Install the built bundle on Linux, for this user (default) or for everyone:
#
#     ./install.sh                     # from the bundle folder (build.sh copies this script into it)
#     packaging/linux/install.sh [--prefix DIR] [BUNDLE]      # BUNDLE default dist/equideq
#     ./install.sh --uninstall [--prefix DIR]
#
# PREFIX defaults to ~/.local (as root: /usr/local). It copies the bundle to PREFIX/lib/equideq, links
# PREFIX/bin/equideq-workbench and PREFIX/bin/equideq to it, and installs the desktop entry
# (PREFIX/share/applications) and the icon at every hicolor size (PREFIX/share/icons/hicolor).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
prefix=$([ "$(id -u)" = 0 ] && echo /usr/local || echo "$HOME/.local")
uninstall=0
bundle=""
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix=$2; shift 2 ;;
        --uninstall) uninstall=1; shift ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) bundle=$1; shift ;;
    esac
done
if [ -z "$bundle" ]; then
    if [ -x "$HERE/equideq-workbench" ]; then bundle=$HERE; else bundle=$HERE/../../dist/equideq; fi
fi

app_dir=$prefix/lib/equideq
desktop=$prefix/share/applications/equideq-workbench.desktop
icons=$prefix/share/icons/hicolor
sizes="16 32 48 64 128 256 512"

if [ "$uninstall" = 1 ]; then
    rm -rf "$app_dir" "$desktop" "$prefix/bin/equideq-workbench" "$prefix/bin/equideq"
    for size in $sizes; do rm -f "$icons/${size}x${size}/apps/equideq-workbench.png"; done
    rm -f "$icons/scalable/apps/equideq-workbench.svg"
    echo "removed EquiDEQ Workbench from $prefix"
    exit 0
fi

if [ ! -x "$bundle/equideq-workbench" ]; then
    echo "no bundle at $bundle (build it with packaging/build.sh)" >&2
    exit 2
fi
bundle=$(cd "$bundle" && pwd)
source_icons=$bundle/_internal/resources/icons

rm -rf "$app_dir"
mkdir -p "$prefix/lib" "$prefix/bin" "$(dirname "$desktop")"
cp -a "$bundle" "$app_dir"
ln -sfn "$app_dir/equideq-workbench" "$prefix/bin/equideq-workbench"
ln -sfn "$app_dir/equideq" "$prefix/bin/equideq"
for size in $sizes; do
    install -D -m 644 "$source_icons/equideq-$size.png" "$icons/${size}x${size}/apps/equideq-workbench.png"
done
install -D -m 644 "$source_icons/equideq.svg" "$icons/scalable/apps/equideq-workbench.svg"
# the absolute path: a desktop session's PATH need not hold PREFIX/bin
sed -e "s|^Exec=.*|Exec=$app_dir/equideq-workbench|" -e "s|^TryExec=.*|TryExec=$app_dir/equideq-workbench|" \
    "$bundle/equideq-workbench.desktop" > "$desktop"
chmod 644 "$desktop"
command -v update-desktop-database >/dev/null && update-desktop-database -q "$(dirname "$desktop")" || true
command -v gtk-update-icon-cache >/dev/null && gtk-update-icon-cache -q -t "$icons" || true
echo "installed EquiDEQ Workbench $("$app_dir/equideq" --version | cut -d' ' -f2) in $app_dir"
echo "start it from the applications menu or with $prefix/bin/equideq-workbench"
