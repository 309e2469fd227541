//! What the CPU under us can do, detected once at run time, and which path each hot kernel takes
//! on it. Kernels are compiled for every path and choose here; nothing is decided at build time.

use std::sync::OnceLock;

/// The instruction-set extensions the kernels dispatch on.
#[derive(Clone, Debug, Default)]
pub struct Cpu {
    /// "model name" of /proc/cpuinfo (what `lscpu` prints).
    pub model: String,
    pub avx2_fma: bool,
    /// AVX-512 F + BW + VL + DQ (what gemm's and our AVX-512 kernels use).
    pub avx512: bool,
    /// vdpbf16ps: bf16 pairs multiplied and accumulated into f32.
    pub avx512_bf16: bool,
    /// AMX tiles with bf16 (Sapphire Rapids and later), as the kernel reports it.
    pub amx_bf16: bool,
}

impl Cpu {
    fn detect() -> Cpu {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            cpuinfo
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_default()
        };
        let flags = field("flags");
        let has_flag = |f: &str| flags.split_whitespace().any(|x| x == f);
        #[cfg(target_arch = "x86_64")]
        let (avx2_fma, avx512, avx512_bf16) = (
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512dq"),
            is_x86_feature_detected!("avx512bf16"),
        );
        #[cfg(not(target_arch = "x86_64"))]
        let (avx2_fma, avx512, avx512_bf16) = (false, false, false);
        Cpu {
            model: field("model name"),
            avx2_fma,
            avx512,
            avx512_bf16: avx512 && avx512_bf16,
            // Rust's detection of AMX is not stable yet; the kernel's flag says whether the OS
            // enabled it.
            amx_bf16: has_flag("amx_bf16") && has_flag("amx_tile"),
        }
    }

    /// The extensions as a short list, e.g. "avx2 fma avx512 avx512_bf16".
    pub fn flags(&self) -> String {
        let mut f = vec![];
        for (on, name) in [
            (self.avx2_fma, "avx2 fma"),
            (self.avx512, "avx512"),
            (self.avx512_bf16, "avx512_bf16"),
            (self.amx_bf16, "amx_bf16"),
        ] {
            if on {
                f.push(name);
            }
        }
        if f.is_empty() {
            "none of avx2/avx512/amx".into()
        } else {
            f.join(" ")
        }
    }
}

/// The CPU this process runs on.
pub fn cpu() -> &'static Cpu {
    static CPU: OnceLock<Cpu> = OnceLock::new();
    CPU.get_or_init(Cpu::detect)
}

/// The SIMD width a kernel family runs at here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512,
}

impl Isa {
    /// The widest the CPU has, or narrower when `RLHF_ISA=avx2|scalar` asks (to measure one
    /// path against another on the same machine).
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            let widest = *Isa::available().last().unwrap_or(&Isa::Scalar);
            match std::env::var("RLHF_ISA").as_deref() {
                Ok("scalar") => Isa::Scalar,
                Ok("avx2") if widest != Isa::Scalar => Isa::Avx2,
                _ => widest,
            }
        })
    }

    /// Every path this CPU can run (for parity tests), narrowest first.
    pub fn available() -> Vec<Isa> {
        let c = cpu();
        let mut v = vec![Isa::Scalar];
        if c.avx2_fma {
            v.push(Isa::Avx2);
        }
        if c.avx512 {
            v.push(Isa::Avx512);
        }
        v
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

/// The path each hot kernel takes on this CPU, for `rlhf bench` and logs.
pub fn kernel_paths() -> Vec<(&'static str, String)> {
    let c = cpu();
    let gemm = if c.avx512 {
        "avx512 (gemm x4x6)"
    } else if c.avx2_fma {
        "avx2 (gemm x2x6)"
    } else {
        "scalar (gemm)"
    };
    vec![
        ("gemm_f32", gemm.to_string()),
        ("decode_matmul", super::skinny::path().name().to_string()),
        ("gemm_bf16", super::bf16::path()),
    ]
}
