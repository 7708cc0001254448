#!/usr/bin/env bash
# The wheel as a new user gets it: build it, install it (not editable) into a fresh virtual
# environment, and run the main commands from a folder that holds a file named export.py
# (a user's own export.py must not shadow Distillery's modules).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
COCO128="${DISTILLERY_COCO128:-$ROOT/../shared/data/coco128}"
WORK="$(mktemp -d /tmp/distillery-wheel-check.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
cd "$ROOT"

echo "== wheel check: build"
"$ROOT/.venv/bin/python" -m build --wheel --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; exit 1; }
WHEEL="$(ls "$WORK"/dist/distillery-*.whl)"
# top-level names inside the wheel: only the package and its metadata
TOP="$(python3 -c "import sys, zipfile; print(' '.join(sorted({n.split('/')[0] for n in zipfile.ZipFile(sys.argv[1]).namelist()})))" "$WHEEL")"
echo "wheel $(basename "$WHEEL"): top level: $TOP"
for name in $TOP; do
  case "$name" in distillery|distillery-*.dist-info) ;; *) echo "FAIL: wheel has top-level $name"; exit 1;; esac
done

echo "== wheel check: install into a fresh venv"
if [ -n "${DISTILLERY_WHEEL_VENV:-}" ]; then
  # developers only: reuse a venv that already holds the dependencies; the wheel is still reinstalled
  ln -s "$DISTILLERY_WHEEL_VENV" "$WORK/venv"
  "$WORK/venv/bin/pip" install -q --no-deps --force-reinstall "$WHEEL" 2>&1 | grep -v "^WARNING: Location" || true
else
  python3 -m venv "$WORK/venv"
  "$WORK/venv/bin/pip" install -q "$WHEEL" 2>&1 | grep -v "^WARNING: Location" || true
fi
# from outside the repository: its distillery/ folder would shadow the installed package
(cd "$WORK" && "$WORK/venv/bin/python" -c "import distillery.engine")
SITE="$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
for name in engine labeling student export configs; do
  if [ -e "$SITE/$name" ] || [ -e "$SITE/$name.py" ]; then echo "FAIL: site-packages holds a top-level $name"; exit 1; fi
done
for cfg in distillery/configs/teachers/default.yaml distillery/configs/ontologies/coco80.yaml \
           distillery/configs/curation/default.yaml distillery/configs/devices/jetson-orin-nx.yaml; do
  [ -f "$SITE/$cfg" ] || { echo "FAIL: $cfg missing from the installed package"; exit 1; }
done

echo "== wheel check: commands from a folder with an export.py"
mkdir -p "$WORK/user"
cd "$WORK/user"
printf 'raise SystemExit("the user\\x27s own export.py was imported")\n' > export.py
cp export.py engine.py
D="$WORK/venv/bin/distillery"
"$D" --help >/dev/null
"$D" configs list
"$D" configs show coco80 > coco80.yaml && grep -c ': ' coco80.yaml
"$D" teachers tiny teachers
IMAGES=("$COCO128"/images/*.jpg)
printf '%s\n' "${IMAGES[@]:0:4}" > four.txt
"$D" label four.txt --ontology coco80 --teachers teachers/teachers.yaml --store store --quiet
"$D" labels export --store store --format coco --out store/four.json
"$WORK/venv/bin/python" - <<'PY'
from pycocotools.coco import COCO
c = COCO("store/four.json")
assert len(c.imgs) == 4, f"expected 4 images in the COCO export, got {len(c.imgs)}"
assert len(c.cats) == 80, f"expected the 80 COCO classes, got {len(c.cats)}"
print(f"wheel check: COCO export holds {len(c.imgs)} images, {len(c.anns)} annotations, {len(c.cats)} classes")
PY
echo "wheel check: passed"
