/* The case viewer: Niivue (the global `niivue`, vendored) on one canvas; the selected case's volume and map come
   from <script type="text/plain" id="vd-N-vol|map"> elements as base64 gzipped NIfTI, decoded when the case is
   opened. Radiological convention (patient's right on the screen's left), orientation letters on every plane.
   report.js owns the case list and calls window.resdxViewer.open(row) when a case is selected. */
(function () {
  "use strict";
  function $(id) { return document.getElementById(id); }
  var canvas = $("v-gl");
  if (!canvas || typeof niivue === "undefined") return;
  /* CT presets as [low, high] HU from window width/level: soft tissue W400/L40, lung W1500/L-600, bone W1800/L400. */
  var CT_PRESETS = [["soft", "soft tissue (W400 L40)", -160, 240], ["lung", "lung (W1500 L-600)", -1350, 150],
                    ["bone", "bone (W1800 L400)", -500, 1300], ["auto", "auto (2–98th percentile)", null, null]];
  var OTHER_PRESETS = [["auto", "auto (2–98th percentile)", null, null], ["full", "full range", null, null]];
  var AXES = ["axial", "coronal", "sagittal"];  /* Niivue's axCorSag 0, 1, 2; their normals are S, A, R */
  var nv = null, current = null, queue = Promise.resolve(), lastPlane = 0, loads = 0;
  var state = {caseIndex: null, ready: false, error: ""};

  function fmt(x, d) { return (x === null || x === undefined || isNaN(x)) ? "–" : Number(x).toFixed(d); }
  function opacity() { return $("v-map-on").checked ? Number($("v-opacity").value) / 100 : 0; }

  async function init() {
    if (!document.createElement("canvas").getContext("webgl2")) {
      $("v-nogl").hidden = false; canvas.hidden = true;
      throw new Error("no WebGL2");
    }
    nv = new niivue.Niivue({
      backColor: [0, 0, 0, 1], crosshairColor: [0.1, 0.75, 1, 1], crosshairWidth: 1, show3Dcrosshair: false,
      isColorbar: true, isRadiologicalConvention: true, isOrientationTextVisible: true,
      showAllOrientationMarkers: true, multiplanarShowRender: 0 /* never a 3D tile */,
      multiplanarLayout: 2 /* 2x2 grid */, dragMode: niivue.DRAG_MODE.windowing, dragAndDropEnabled: false,
      viewModeHotKey: "", clipPlaneHotKey: "", cycleClipPlaneHotKey: "", logLevel: "error", textHeight: 0.06, fontColor: [1, 1, 0.6, 1],
      isNearestInterpolation: true  /* show the voxels as they are: a reader judges the real grid */
    });
    await nv.attachTo("v-gl");
    nv.setSliceType(nv.sliceTypeMultiplanar);
    nv.onLocationChange = showCrosshair;
    nv.onIntensityChange = showWindow;
  }

  function presetsFor(modality) { return modality === "CT" ? CT_PRESETS : OTHER_PRESETS; }
  function fillPresets(modality) {
    var sel = $("v-wl");
    while (sel.firstChild) sel.removeChild(sel.firstChild);
    presetsFor(modality).forEach(function (p) {
      var o = document.createElement("option"); o.value = p[0]; o.textContent = p[1]; sel.appendChild(o);
    });
  }
  function applyPreset() {
    if (!nv || nv.volumes.length < 1) return;
    var v = nv.volumes[0], key = $("v-wl").value;
    var p = presetsFor(current.modality).filter(function (q) { return q[0] === key; })[0];
    if (!p) return;
    if (key === "auto") { v.cal_min = v.robust_min; v.cal_max = v.robust_max; }
    else if (key === "full") { v.cal_min = v.global_min; v.cal_max = v.global_max; }
    else { v.cal_min = p[2]; v.cal_max = p[3]; }
    nv.updateGLVolume();
    showWindow(v);
  }
  function showWindow(v) {
    if (!v || v !== (nv && nv.volumes[0])) return;
    var w = v.cal_max - v.cal_min, l = (v.cal_max + v.cal_min) / 2, u = current && current.units ? " " + current.units : "";
    $("v-window").textContent = "W " + fmt(w, 0) + " L " + fmt(l, 0) + u + " (" + fmt(v.cal_min, 0) + " to " +
      fmt(v.cal_max, 0) + ")";
  }

  /* Niivue's voxel indices are those of its RAS-reordered copy; the readout gives the file's own (i, j, k),
     from the millimetres through the grid's inverse affine, so they match the NIfTI overlay and the source. */
  function fileVoxel(mm) {
    var w = current.toVoxel, out = [];
    for (var r = 0; r < 3; r++) out.push(Math.round(w[4 * r] * mm[0] + w[4 * r + 1] * mm[1] + w[4 * r + 2] * mm[2] + w[4 * r + 3]));
    return out;
  }
  /* The stored value at a file voxel, scaled as NIfTI says (Niivue keeps `img` in the file's order). */
  function valueAt(image, vox) {
    var d = image.hdr.dims;
    if (vox[0] < 0 || vox[1] < 0 || vox[2] < 0 || vox[0] >= d[1] || vox[1] >= d[2] || vox[2] >= d[3]) return null;
    var slope = image.hdr.scl_slope || 1, inter = image.hdr.scl_inter || 0;
    return image.img[vox[0] + d[1] * (vox[1] + d[2] * vox[2])] * slope + inter;
  }
  function describe(frac) {
    var mm = nv.frac2mm(frac), vox = fileVoxel(mm);
    var val = valueAt(nv.volumes[0], vox);
    var m = nv.volumes.length > 1 ? valueAt(nv.volumes[1], vox) : null;
    var u = current.units ? " " + current.units : "";
    return {vox: vox, mm: [mm[0], mm[1], mm[2]], value: val, map: m,
            text: "voxel " + vox.join(", ") + " · RAS " + fmt(mm[0], 1) + ", " + fmt(mm[1], 1) + ", " + fmt(mm[2], 1) +
                  " mm · value " + fmt(val, current.units ? 0 : 3) + u + " · map " + fmt(m, 3)};
  }
  function showCrosshair() {
    if (!current || !nv.volumes.length) return;
    $("v-cross").textContent = describe(nv.scene.crosshairPos).text;
  }
  function canvasPos(ev) {
    var r = canvas.getBoundingClientRect(), dpr = nv.uiData.dpr || window.devicePixelRatio || 1;
    return [(ev.clientX - r.left) * dpr, (ev.clientY - r.top) * dpr];
  }
  function planeAt(pos) {
    var t = nv.tileIndex(pos[0], pos[1]);
    return t >= 0 && nv.screenSlices[t] ? nv.screenSlices[t].axCorSag : -1;
  }
  canvas.addEventListener("mousemove", function (ev) {
    if (!current || !nv || nv.volumes.length < 1) return;
    var pos = canvasPos(ev), plane = planeAt(pos);
    if (plane >= 0 && plane <= 2) lastPlane = plane;
    var frac = nv.canvasPos2frac(pos);
    $("v-hover").textContent = frac[0] < 0 ? "–" : AXES[plane] + " plane · " + describe(frac).text;
  });
  canvas.addEventListener("mouseleave", function () { $("v-hover").textContent = "–"; });
  /* right-drag windowing changes cal_min/cal_max without an intensity event: refresh the readout after it */
  canvas.addEventListener("mouseup", function () {
    setTimeout(function () { if (nv && nv.volumes.length) showWindow(nv.volumes[0]); }, 0);
  });
  /* Arrow keys / Page keys scroll the plane the mouse was last over, one voxel along its normal. */
  canvas.addEventListener("keydown", function (ev) {
    var step = {ArrowUp: 1, ArrowRight: 1, PageUp: 1, ArrowDown: -1, ArrowLeft: -1, PageDown: -1}[ev.key];
    if (!step || !current) return;
    ev.preventDefault(); ev.stopPropagation();
    scroll(lastPlane, step);
  });
  function scroll(plane, step) {
    var mm = nv.frac2mm(nv.scene.crosshairPos), axis = [2, 1, 0][plane];
    var d = nv.volumes[0].hdr.pixDims, size = Math.min(d[1], d[2], d[3]);
    mm[axis] += step * size;
    var frac = nv.mm2frac([mm[0], mm[1], mm[2]]);
    if (frac[axis] < 0 || frac[axis] > 1) return;
    nv.scene.crosshairPos = frac;
    nv.drawScene();
    nv.createOnLocationChange(plane);
  }
  function jumpToPeak() {
    if (!current || !current.peakMM) return;
    nv.scene.crosshairPos = nv.mm2frac(current.peakMM);
    nv.drawScene();
    nv.createOnLocationChange();
  }

  async function load(row) {
    var idx = row.dataset.index, vol = $("vd-" + idx + "-vol"), map = $("vd-" + idx + "-map");
    state.ready = false; state.caseIndex = Number(idx); state.error = "";
    $("v-case").textContent = row.dataset.caseId;
    var d = row.dataset;
    $("v-facts").textContent = " · label " + d.label + " · p " + fmt(Number(d.probability), 3) + " · decision " +
      d.decision + " · uncertainty " + fmt(Number(d.uncertainty), 3) + (d.referred === "1" ? " · refer to a human" : "");
    if (!vol || !map) { $("v-grid").textContent = "no volume for this case (2D or no map)"; state.ready = true; return; }
    if (!nv) await init();
    while (nv.volumes.length) nv.removeVolume(nv.volumes[nv.volumes.length - 1]);
    var a = await niivue.NVImage.loadFromBase64({base64: vol.textContent.trim(), name: "volume.nii.gz", colormap: "gray"});
    var b = await niivue.NVImage.loadFromBase64({base64: map.textContent.trim(), name: "map.nii.gz", colormap: "warm",
                                                opacity: opacity()});
    nv.addVolume(a);
    nv.addVolume(b);
    b.cal_min = 0.1 * b.global_max; b.cal_max = b.global_max;  /* the weakest tenth stays transparent */
    current = {row: row, modality: vol.dataset.modality, units: vol.dataset.units,
               peakMM: vol.dataset.peakMm ? vol.dataset.peakMm.split(",").map(Number) : null,
               toVoxel: vol.dataset.worldToVoxel.split(",").map(Number)};
    fillPresets(current.modality);
    applyPreset();
    nv.setOpacity(1, opacity());
    var f = Number(vol.dataset.factor);
    $("v-grid").textContent = f > 1 ? vol.dataset.grid + " grid block-averaged " + f + "×" + f + "×" + f + " to " +
      vol.dataset.shape : vol.dataset.grid + " grid " + vol.dataset.shape;
    jumpToPeak();
    loads++;
    state.ready = true;
  }
  function open(row) {
    queue = queue.then(function () { return load(row); }).catch(function (e) {
      state.error = String(e && e.message || e); state.ready = true;
    });
    return queue;
  }

  $("v-wl").addEventListener("change", applyPreset);
  $("v-opacity").addEventListener("input", function () { if (nv && nv.volumes.length > 1) nv.setOpacity(1, opacity()); });
  $("v-map-on").addEventListener("change", function () { if (nv && nv.volumes.length > 1) nv.setOpacity(1, opacity()); });
  $("v-peak").addEventListener("click", jumpToPeak);

  /* For the tests and for scripting: the viewer's state in plain numbers. */
  window.resdxViewer = {
    open: open,
    state: function () {
      var s = {caseIndex: state.caseIndex, ready: state.ready, error: state.error, loads: loads};
      if (nv && current && nv.volumes.length) {
        var here = describe(nv.scene.crosshairPos);
        s.vox = here.vox; s.mm = here.mm; s.value = here.value; s.map = here.map;
        s.window = [nv.volumes[0].cal_min, nv.volumes[0].cal_max];
        s.opacity = nv.volumes.length > 1 ? nv.volumes[1].opacity : null;
        s.tiles = nv.screenSlices.map(function (t) { return {plane: t.axCorSag, ltwh: Array.from(t.leftTopWidthHeight)}; });
        s.dpr = nv.uiData.dpr || window.devicePixelRatio || 1;
        s.radiological = nv.opts.isRadiologicalConvention; s.orientationText = nv.opts.isOrientationTextVisible;
      }
      return s;
    }
  };
  var selected = document.querySelector("tr.case.selected");  /* report.js selected it before we existed */
  if (selected) open(selected);
})();
