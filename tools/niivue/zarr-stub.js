// Niivue imports zarrita (and through it numcodecs, 1.4 MB with WebAssembly) only to read OME-Zarr over HTTP.
// The offline report never loads Zarr, so the bundle gets this empty module instead: 0.89 MB instead of 2.3 MB.
export {};
