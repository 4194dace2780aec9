// Lets the `meshtrain` binary find libtorch at run time without
// LD_LIBRARY_PATH: scripts/env.sh points LIBTORCH at the virtualenv's torch.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(dir) = std::env::var("LIBTORCH") {
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{dir}/lib");
    }
}
