#!/bin/sh
# Rebuild the vendored Niivue bundle from the npm registry, at the versions pinned in package-lock.json.
#   tools/niivue/build.sh        (needs Node >= 18 and npm; run from anywhere)
# Writes pipeline/reporting/vendor/niivue.min.js and LICENSES.txt (Niivue's and every bundled package's
# licence), and prints the bundle's SHA-256, which pipeline/reporting/viewer.py checks at report time.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out="$here/../../pipeline/reporting/vendor"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$here/package.json" "$here/package-lock.json" "$here/entry.js" "$here/zarr-stub.js" "$work/"
cd "$work"
npm ci --no-audit --no-fund --loglevel=error
# The npm package ships no LICENSE file; this is the repository's (github.com/niivue/niivue, BSD-2-Clause).
cp "$here/NIIVUE-LICENSE" node_modules/@niivue/niivue/LICENSE
./node_modules/.bin/esbuild entry.js --bundle --format=iife --global-name=niivue --minify --target=es2020 \
  --alias:zarrita=./zarr-stub.js --legal-comments=none --metafile=meta.json --outfile=niivue.min.js
node -e '
const m = require("./meta.json"), fs = require("fs"), path = require("path");
const pkgs = new Set();
for (const k of Object.keys(m.inputs)) {
  const i = k.lastIndexOf("node_modules/"); if (i < 0) continue;
  const rest = k.slice(i + 13).split("/"); pkgs.add(rest[0].startsWith("@") ? rest[0] + "/" + rest[1] : rest[0]);
}
let text = "Licences of the JavaScript bundled into niivue.min.js (built by tools/niivue/build.sh).\n";
for (const p of [...pkgs].sort()) {
  const dir = path.join("node_modules", p), pj = require("./" + dir + "/package.json");
  const lic = fs.readdirSync(dir).find(f => /^(licen[cs]e|copying)/i.test(f));
  text += "\n==== " + p + "@" + pj.version + " (" + pj.license + ")\n\n";
  text += lic ? fs.readFileSync(path.join(dir, lic), "utf8").trim() + "\n" : "(no licence file in the package; licence field: " + pj.license + ")\n";
}
fs.writeFileSync("LICENSES.txt", text);
'
cp niivue.min.js LICENSES.txt "$out/"
sha256sum "$out/niivue.min.js"
