// What the review report uses from Niivue, exposed as the global `niivue` (an IIFE: the report's CSP allows
// inline classic scripts only, and a file:// page cannot import modules).
export { Niivue, NVImage, SLICE_TYPE, DRAG_MODE } from "@niivue/niivue";
