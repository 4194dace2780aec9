//! Compiles the small C++ shim over TorchScript modules (csrc/script.cpp)
//! against the libtorch that torch-sys found and links.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/script.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    // torch-sys (`links = "tch"`) passes its libtorch lib dir on.
    let lib = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys names the libtorch it links (DEP_TCH_LIBTORCH_LIB)"),
    );
    let root = lib.parent().expect("libtorch's lib dir has a parent").to_path_buf();
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("csrc/script.cpp")
        .compile("meshtrain_script");
}
