//! The AMX-BF16 tile kernel of [`crate::matmul`] (x86-64 Linux, Sapphire Rapids and later):
//! bf16 x with several rows times a packed 4-bit W.
//!
//! It computes `Cᵀ = W · xᵀ` one 32-column K chunk at a time: 16 rows of W are decoded in
//! registers into a 1 KB bf16 tile in L1 (`A`, natural row layout, per-block tables rounded to
//! bf16 exactly as `dequantize_4bit` rounds), x is laid out once per call in the pair-interleaved
//! ("VNNI") order `tdpbf16ps` wants for its second operand (`B`), and up to four 16×16 float32
//! accumulator tiles stay in tile registers for the whole K loop. One `tdpbf16ps` does 8192
//! multiply-adds, so the kernel is bound by the decode and by memory, not by FLOPs, at every M.
//!
//! Tile instructions are emitted with `asm!` (the AMX intrinsics are not stable Rust); the
//! kernel needs the OS to grant the tile state to the process (`arch_prctl`), which
//! [`usable`] requests once.

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Rows (and x rows) per tile, and K elements per chunk: one tile row is 64 bytes.
const TILE: usize = 16;
const CHUNK: usize = 32;
/// u16s of one x tile (16 pairs of K × 16 rows × 2).
const B_TILE: usize = TILE * CHUNK;

/// Whether this CPU and OS run AMX-BF16 tiles here (asked once per process).
pub fn usable() -> bool {
    static USABLE: OnceLock<bool> = OnceLock::new();
    *USABLE.get_or_init(request_tile_state)
}

#[cfg(target_os = "linux")]
fn request_tile_state() -> bool {
    // CPUID.(7,0):EDX bit 22 AMX-BF16, bit 24 AMX-TILE; the kernel also uses AVX512-BF16
    // (table rounding) and AVX512-BW (vpermw).
    if !(std::is_x86_feature_detected!("avx512bf16") && std::is_x86_feature_detected!("avx512bw")) {
        return false;
    }
    let leaf7 = __cpuid_count(7, 0); // leaf 7 exists wherever AVX-512 is reported
    if (leaf7.edx >> 22) & 1 == 0 || (leaf7.edx >> 24) & 1 == 0 {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only asks the kernel for a permission; it
    // fails (non-zero) where the kernel or hypervisor does not offer the tile state.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> bool {
    false
}

/// Whether the kernel takes this shape: whole chunks, and blocks that never straddle one.
pub fn applies(k: usize, blocksize: usize) -> bool {
    k.is_multiple_of(CHUNK) && k.is_multiple_of(blocksize) && blocksize.is_multiple_of(CHUNK)
}

/// x (M×K bf16 bits) in the `B` tile order: for 16-row group g and chunk c, 512 u16s where
/// element `p * 32 + i * 2 + j` is `x[g * 16 + i][c * 32 + 2p + j]`; rows past M are zero.
pub fn prep_x(x: &[u16], m: usize, k: usize) -> Vec<u16> {
    let groups = m.div_ceil(TILE);
    let chunks = k / CHUNK;
    let mut xp = vec![0u16; groups * chunks * B_TILE];
    for i in 0..m {
        let (g, ii) = (i / TILE, i % TILE);
        let row = &x[i * k..(i + 1) * k];
        for c in 0..chunks {
            let tile = &mut xp[(g * chunks + c) * B_TILE..][..B_TILE];
            for p in 0..CHUNK / 2 {
                tile[p * 32 + ii * 2] = row[c * CHUNK + 2 * p];
                tile[p * 32 + ii * 2 + 1] = row[c * CHUNK + 2 * p + 1];
            }
        }
    }
    xp
}

/// What a task reads.
pub struct AmxArgs<'a> {
    pub packed: &'a [u8],
    pub absmax: &'a [f32],
    pub table: &'a [f32; 16],
    pub k: usize,
    pub bs: usize,
    pub m: usize,
    /// [`prep_x`] of x.
    pub xp: &'a [u16],
}

/// The 64-byte tile configuration: palette 1, every tile 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn all_full() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1; // palette
        for t in 0..8 {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            c[48 + t] = TILE as u8;
        }
        TileConfig(c)
    }
}

#[repr(C, align(64))]
struct Aligned<const N: usize>([u8; N]);

macro_rules! tile_load {
    ($t:literal, $ptr:expr) => {
        asm!(concat!("tileloadd tmm", $t, ", [{p} + {s} * 1]"), p = in(reg) $ptr, s = in(reg) 64usize,
             options(nostack, readonly, preserves_flags))
    };
}
macro_rules! tile_dp {
    ($c:literal, $a:literal, $b:literal) => {
        asm!(
            concat!("tdpbf16ps tmm", $c, ", tmm", $a, ", tmm", $b),
            options(nostack, nomem, preserves_flags)
        )
    };
}
macro_rules! tile_store {
    ($t:literal, $ptr:expr) => {
        asm!(concat!("tilestored [{p} + {s} * 1], tmm", $t), p = in(reg) $ptr, s = in(reg) 64usize,
             options(nostack, preserves_flags))
    };
}
macro_rules! tile_zero {
    ($t:literal) => {
        asm!(
            concat!("tilezero tmm", $t),
            options(nostack, nomem, preserves_flags)
        )
    };
}

/// Rows `r0..r1` of W (`r0` a multiple of 16) against every row of x; sums go to
/// `out[(r - r0) * m + i]`.
///
/// # Safety
/// [`usable`] must have returned true, [`applies`] hold for (k, bs), and the lengths of
/// `a` match the shapes (validated by the caller).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")]
pub unsafe fn task(a: &AmxArgs, r0: usize, r1: usize, out: &mut [f32]) {
    let cfg = TileConfig::all_full();
    asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
    let groups = a.m.div_ceil(TILE);
    let mut g0 = 0;
    while g0 < groups {
        let mg = (groups - g0).min(4);
        // Accumulators: 4 tiles as (W-row groups) × (x groups).
        let wr = if mg == 1 {
            4
        } else if mg == 2 {
            2
        } else {
            1
        };
        let mut n0 = r0;
        while n0 < r1 {
            match (wr, mg) {
                (4, _) => pass::<4, 1>(a, n0, r1, g0, out, r0),
                (2, _) => pass::<2, 2>(a, n0, r1, g0, out, r0),
                (_, 3) => pass::<1, 3>(a, n0, r1, g0, out, r0),
                _ => pass::<1, 4>(a, n0, r1, g0, out, r0),
            }
            n0 += wr * TILE;
        }
        g0 += mg;
    }
    asm!("tilerelease", options(nostack, nomem));
}

/// One pass over K for W rows `n0 .. n0 + WR * 16` (rows from `r1` on are zero) and x groups
/// `g0 .. g0 + MG`: accumulator tile `w * MG + g` holds (W group w) × (x group g).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")]
unsafe fn pass<const WR: usize, const MG: usize>(
    a: &AmxArgs,
    n0: usize,
    r1: usize,
    g0: usize,
    out: &mut [f32],
    r0: usize,
) {
    let k = a.k;
    let chunks = k / CHUNK;
    let rows = (r1 - n0).min(WR * TILE);
    // The decoded A tiles (rows past `rows` stay zero). A second buffer alternating by chunk,
    // and moving the tables off the buffers' 4 KB offsets, were measured: no difference.
    let mut abuf = Aligned::<{ 4 * TILE * 64 }>([0; 4 * TILE * 64]);
    let ap = abuf.0.as_mut_ptr();
    // Per-row bf16 tables of the current block (16 words used of each 64-byte entry).
    let mut luts = [_mm512_setzero_si512(); 4 * TILE];
    let table = _mm512_loadu_ps(a.table.as_ptr());
    let blocks_per_row = k / a.bs;
    // Blocksizes are powers of two: a mask and a shift, not a division per chunk.
    let block_mask = a.bs / CHUNK - 1;
    let block_shift = (a.bs / CHUNK).trailing_zeros();
    let low_nibble = _mm512_set1_epi32(15);
    let scale_bytes_per_chunk = WR * TILE * 4 * CHUNK / a.bs;
    tile_zero!(0);
    tile_zero!(1);
    tile_zero!(2);
    tile_zero!(3);
    for c in 0..chunks {
        if c & block_mask == 0 {
            let blk = c >> block_shift;
            for (r, lut) in luts.iter_mut().enumerate().take(rows) {
                let s = *a.absmax.get_unchecked((n0 + r) * blocks_per_row + blk);
                let h = _mm512_cvtneps_pbh(_mm512_mul_ps(table, _mm512_set1_ps(s)));
                *lut = _mm512_castsi256_si512(std::mem::transmute::<__m256bh, __m256i>(h));
            }
        }
        // Decode: packed byte j of the chunk holds elements 2j (high nibble) and 2j + 1; the
        // index word pair (hi, lo) makes vpermw write them in natural order.
        // The pass reads its rows' bytes (contiguous) as one stream per row, more streams than
        // the hardware prefetchers track: each chunk prefetches its share of the next pass's
        // bytes (WR * 256 of them), so that pass finds them in L2.
        let next = a
            .packed
            .as_ptr()
            .wrapping_add((n0 + WR * TILE) * k / 2 + c * WR * TILE * CHUNK / 2);
        for l in 0..WR * 4 {
            _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(l * 64).cast());
        }
        // And its absmax: WR * 16 rows * 4 bytes per block, spread the same way.
        let next_scales = a
            .absmax
            .as_ptr()
            .wrapping_add((n0 + WR * TILE) * blocks_per_row)
            .cast::<u8>()
            .wrapping_add(c * scale_bytes_per_chunk);
        for l in (0..scale_bytes_per_chunk).step_by(64) {
            _mm_prefetch::<_MM_HINT_T1>(next_scales.wrapping_add(l).cast());
        }
        for (r, lut) in luts.iter().enumerate().take(rows) {
            let src = a.packed.as_ptr().add((n0 + r) * k / 2 + c * CHUNK / 2);
            let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(src.cast()));
            let idx = _mm512_or_si512(
                _mm512_srli_epi32::<4>(v),
                _mm512_slli_epi32::<16>(_mm512_and_si512(v, low_nibble)),
            );
            _mm512_store_si512(ap.add(r * 64).cast(), _mm512_permutexvar_epi16(idx, *lut));
        }
        let b = |g: usize| a.xp.as_ptr().add(((g0 + g) * chunks + c) * B_TILE);
        let at = |w: usize| ap.add(w * TILE * 64);
        match (WR, MG) {
            (4, 1) => {
                tile_load!(5, b(0));
                tile_load!(4, at(0));
                tile_dp!(0, 4, 5);
                tile_load!(6, at(1));
                tile_dp!(1, 6, 5);
                tile_load!(4, at(2));
                tile_dp!(2, 4, 5);
                tile_load!(6, at(3));
                tile_dp!(3, 6, 5);
            }
            (2, 2) => {
                tile_load!(4, at(0));
                tile_load!(6, at(1));
                tile_load!(5, b(0));
                tile_dp!(0, 4, 5);
                tile_dp!(2, 6, 5);
                tile_load!(7, b(1));
                tile_dp!(1, 4, 7);
                tile_dp!(3, 6, 7);
            }
            _ => {
                tile_load!(4, at(0));
                tile_load!(5, b(0));
                tile_dp!(0, 4, 5);
                tile_load!(7, b(1));
                tile_dp!(1, 4, 7);
                tile_load!(6, b(2));
                tile_dp!(2, 4, 6);
                if MG == 4 {
                    tile_load!(5, b(3));
                    tile_dp!(3, 4, 5);
                }
            }
        }
    }
    // Accumulators out: tile t = w * MG + g is 16 (W rows) × 16 (x rows) float32.
    let mut cbuf = Aligned::<{ 4 * TILE * 64 }>([0; 4 * TILE * 64]);
    let cp = cbuf.0.as_mut_ptr();
    tile_store!(0, cp);
    tile_store!(1, cp.add(1024));
    tile_store!(2, cp.add(2048));
    tile_store!(3, cp.add(3072));
    let cf = cp.cast::<f32>();
    let m = a.m;
    for w in 0..WR {
        for g in 0..MG {
            let t = w * MG + g;
            let i0 = (g0 + g) * TILE;
            if i0 >= m {
                continue;
            }
            let ni = (m - i0).min(TILE);
            for r in 0..TILE {
                let n = n0 + w * TILE + r;
                if n >= r1 {
                    break;
                }
                let dst = &mut out[(n - r0) * m + i0..][..ni];
                let src = std::slice::from_raw_parts(cf.add(t * 256 + r * TILE), ni);
                dst.copy_from_slice(src);
            }
        }
    }
}
