#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| rlhf_fuzz::run(
    rlhf::fuzzing::Target::ChatTemplate,
    data
));
