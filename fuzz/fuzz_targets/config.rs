//! The configuration loader: any text (with `${VAR}`s resolved to a fixed value or
//! left unset) either loads or is refused with a message, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    let lookup = |name: &str| (name.len() % 2 == 0).then(|| format!("value-of-{name}"));
    match tollgate_proxy::Config::from_yaml(source, "fuzz.yaml", &lookup) {
        Ok(config) => {
            let _ = format!("{config:?}");
        }
        Err(err) => {
            let _ = err.to_string();
        }
    }
});
