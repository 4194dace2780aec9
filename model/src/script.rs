//! TorchScript modules brought by users (`torch.jit.script` or `trace`,
//! saved with `torch.jit.save`), trained like the built-in models.
//!
//! tch loads such modules but exposes only their parameters; a module's
//! buffers (batch-norm statistics) are part of its state and must be
//! exchanged too. A small C++ shim (csrc/script.cpp) reaches both, and
//! returns libtorch's errors as text instead of throwing them.

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::Path;

use tch::{Device, Tensor};
use torch_sys::C_tensor;

use crate::{ModelError, Result};

#[repr(C)]
struct ModuleHandle {
    _private: [u8; 0],
}

extern "C" {
    fn mt_free_str(s: *mut c_char);
    fn mt_script_load(path: *const c_char, cuda_index: c_int, err: *mut *mut c_char) -> *mut ModuleHandle;
    fn mt_script_free(m: *mut ModuleHandle);
    fn mt_script_train(m: *mut ModuleHandle, on: c_int, err: *mut *mut c_char) -> c_int;
    fn mt_script_forward(m: *mut ModuleHandle, x: *const C_tensor, err: *mut *mut c_char) -> *mut C_tensor;
    fn mt_script_state(
        m: *mut ModuleHandle,
        data: *mut c_void,
        f: extern "C" fn(*mut c_void, *const c_char, *mut C_tensor, c_int),
        err: *mut *mut c_char,
    ) -> c_int;
}

/// Takes the error text the shim allocated, if any.
fn take_error(err: *mut c_char) -> Option<String> {
    if err.is_null() {
        return None;
    }
    // SAFETY: the shim returns a NUL-terminated malloc'd string or null.
    let text = unsafe { CStr::from_ptr(err) }.to_string_lossy().trim().to_string();
    unsafe { mt_free_str(err) };
    Some(text)
}

/// One named tensor of a module's state.
pub struct StateTensor {
    pub name: String,
    pub tensor: Tensor,
    /// A buffer (not a parameter): exchanged, never given gradients.
    pub buffer: bool,
}

extern "C" fn collect(data: *mut c_void, name: *const c_char, t: *mut C_tensor, buffer: c_int) {
    // SAFETY: `data` is the Vec passed by `state` below, for this call only;
    // the shim hands over a fresh tensor handle we now own.
    let out = unsafe { &mut *(data as *mut Vec<StateTensor>) };
    let name = unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned();
    out.push(StateTensor {
        name,
        tensor: unsafe { Tensor::from_ptr(t) },
        buffer: buffer != 0,
    });
}

/// A loaded TorchScript module, used from one thread at a time.
pub struct ScriptModule {
    handle: *mut ModuleHandle,
    training: Cell<Option<bool>>,
}

// SAFETY: the module is only ever used by whichever single thread owns it
// (it is not Sync); libtorch modules may move between threads.
unsafe impl Send for ScriptModule {}

impl Drop for ScriptModule {
    fn drop(&mut self) {
        // SAFETY: created by mt_script_load, freed once.
        unsafe { mt_script_free(self.handle) }
    }
}

fn script_error(path: &Path, detail: impl Into<String>) -> ModelError {
    ModelError::Script {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

impl ScriptModule {
    /// Loads the module saved at `path` onto `device`.
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        let cuda = match device {
            Device::Cpu => -1,
            Device::Cuda(i) => i as c_int,
            other => {
                return Err(ModelError::Device(format!(
                    "{other:?} is not supported for TorchScript modules"
                )))
            }
        };
        if !path.exists() {
            return Err(script_error(path, "no such file"));
        }
        let c_path = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| script_error(path, "the path holds a NUL byte"))?;
        let mut err = std::ptr::null_mut();
        // SAFETY: valid C string; err is an out pointer.
        let handle = unsafe { mt_script_load(c_path.as_ptr(), cuda, &mut err) };
        if let Some(e) = take_error(err) {
            // libtorch goes on about checkpoints after its first sentence.
            let line = error_line(&e);
            let sentence = line.split_once(". ").map_or(line, |(s, _)| s);
            return Err(script_error(path, format!("not a TorchScript module: {sentence}")));
        }
        if handle.is_null() {
            return Err(script_error(path, "libtorch could not load it"));
        }
        Ok(Self {
            handle,
            training: Cell::new(None),
        })
    }

    /// Every parameter, then every buffer, sharing storage with the module.
    pub fn state(&self) -> Result<Vec<StateTensor>> {
        let mut out: Vec<StateTensor> = Vec::new();
        let mut err = std::ptr::null_mut();
        // SAFETY: `collect` casts `data` back to this Vec during the call.
        unsafe { mt_script_state(self.handle, &mut out as *mut _ as *mut c_void, collect, &mut err) };
        match take_error(err) {
            Some(e) => Err(ModelError::Torch(tch::TchError::Torch(e))),
            None => Ok(out),
        }
    }

    fn set_training(&self, on: bool) -> Result<()> {
        if self.training.get() == Some(on) {
            return Ok(());
        }
        let mut err = std::ptr::null_mut();
        // SAFETY: live handle; err is an out pointer.
        unsafe { mt_script_train(self.handle, on as c_int, &mut err) };
        if let Some(e) = take_error(err) {
            return Err(ModelError::Torch(tch::TchError::Torch(e)));
        }
        self.training.set(Some(on));
        Ok(())
    }

    /// `forward(xs)`, in training or evaluation mode.
    pub fn forward(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.set_training(train)?;
        let mut err = std::ptr::null_mut();
        // SAFETY: live handle and tensor; the result is a new handle we own.
        let out = unsafe { mt_script_forward(self.handle, xs.as_ptr(), &mut err) };
        if let Some(e) = take_error(err) {
            return Err(ModelError::Torch(tch::TchError::Torch(error_line(&e).to_string())));
        }
        if out.is_null() {
            return Err(ModelError::Torch(tch::TchError::Torch(
                "forward returned nothing".into(),
            )));
        }
        Ok(unsafe { Tensor::from_ptr(out) })
    }
}

/// libtorch's script errors run to many lines (the TorchScript call stack,
/// then the Python-style `RuntimeError: ...` that says what went wrong):
/// that last error line, else the first non-empty one.
fn error_line(text: &str) -> &str {
    let lines = || text.lines().map(str::trim).filter(|l| !l.is_empty());
    lines()
        .rev()
        .find(|l| {
            l.split_once(':')
                .is_some_and(|(k, _)| k.ends_with("Error") && !k.contains(' '))
        })
        .or_else(|| lines().next())
        .unwrap_or(text)
}
