//! Tests of the snapshot formats as a whole. `fuzz_seeds` writes the fuzz targets' seed inputs
//! from the current formats and checks the properties those targets assert.

mod fuzz_seeds;
