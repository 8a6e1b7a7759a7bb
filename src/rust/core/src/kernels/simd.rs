//! Run-time choice of vector width for the hand-written loops.
//!
//! The crate is compiled for baseline x86-64 (SSE2) so that one build runs on
//! any machine. A loop written in the plain indexed form LLVM vectorizes gets
//! 4-lane code there; `wide_copies!` compiles the same body again for AVX-512
//! and for AVX2 + FMA and calls the widest copy the CPU supports.
//!
//! It is the crate's one dispatch macro: the fused likelihood, the sparse
//! first layer, Adam and Harmony's soft clustering use it. The copies give
//! the same bits: Rust never fuses a · b + c on its own, so wider registers
//! change how many lanes run at once, not the arithmetic, except where a body
//! asks for `madd` (the `= fma` form).

/// `wide_copies! { fn name(a: A, b: B) -> R = body }` (the return type may
/// be left out) defines `fn name`, which calls `body(a, b)` compiled for
/// AVX-512, else for AVX2 + FMA, else for the baseline. `body` should be
/// `#[inline(always)]` so that each copy gets its own code.
///
/// With `= fma body`, `body` takes a `const FMA: bool`: true in the AVX
/// copies (where `f32::mul_add` is one instruction), false in the baseline
/// one (where it would be a library call).
macro_rules! wide_copies {
    ($(#[$m:meta])* $vis:vis fn $name:ident ($($a:ident: $t:ty),* $(,)?) = fma $body:ident) => {
        $crate::kernels::simd::wide_copies! { $(#[$m])* $vis fn $name($($a: $t),*) -> () = fma $body }
    };
    ($(#[$m:meta])* $vis:vis fn $name:ident ($($a:ident: $t:ty),* $(,)?) = $body:path) => {
        $crate::kernels::simd::wide_copies! { $(#[$m])* $vis fn $name($($a: $t),*) -> () = $body }
    };
    ($(#[$m:meta])* $vis:vis fn $name:ident ($($a:ident: $t:ty),* $(,)?) -> $ret:ty = fma $body:ident) => {
        $crate::kernels::simd::wide_copies! {
            @copies $(#[$m])* $vis fn $name($($a: $t),*) -> $ret; [$body::<true>] [$body::<false>]
        }
    };
    ($(#[$m:meta])* $vis:vis fn $name:ident ($($a:ident: $t:ty),* $(,)?) -> $ret:ty = $body:path) => {
        $crate::kernels::simd::wide_copies! { @copies $(#[$m])* $vis fn $name($($a: $t),*) -> $ret; [$body] [$body] }
    };
    // The three copies: `wide` called in the AVX ones, `base` in the baseline.
    (@copies $(#[$m:meta])* $vis:vis fn $name:ident ($($a:ident: $t:ty),*) -> $ret:ty;
        [$($wide:tt)*] [$($base:tt)*]) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($a: $t),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($a: $t),*) -> $ret {
                    $($wide)*($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($a: $t),*) -> $ret {
                    $($wide)*($($a),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features the copy is compiled for.
                    return unsafe { avx512($($a),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { avx2($($a),*) };
                }
            }
            $($base)*($($a),*)
        }
    };
}
pub(crate) use wide_copies;

/// a · b + c: one fused instruction where `FMA` (in the AVX copies of a
/// `= fma` body), two operations otherwise.
#[inline(always)]
pub(crate) fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}
