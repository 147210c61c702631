//! Reading a file of QEMU's firmware configuration device (fw_cfg) through
//! its x86 I/O ports, the way firmware does: no `qemu_fw_cfg` module to load
//! on the boot path, and nothing exposed under /sys for the guest's other
//! processes. The host hands the agent its secret this way
//! ([`agent::auth::SECRET_FW_CFG_NAME`]).
//!
//! The interface (QEMU's docs/specs/fw_cfg.rst): a 16-bit write of a key
//! to the selector port 0x510 selects an item; byte reads of the data port
//! 0x511 return its bytes in order. Item 0x19 is the file directory: a
//! big-endian count, then 64-byte entries (size, key, reserved, name).

/// The selector port (16-bit writes).
const SELECTOR_PORT: u16 = 0x510;
/// The data port (byte reads).
const DATA_PORT: u16 = 0x511;
/// Key of the file directory.
const FILE_DIR: u16 = 0x19;
/// Bytes of a directory entry, and of its name field.
const ENTRY_LEN: usize = 64;
const NAME_LEN: usize = 56;
/// More entries than QEMU ever has: a bound on what a corrupt directory
/// makes us read.
const MAX_FILES: u32 = 4096;
/// Files the agent reads are small.
const MAX_FILE: u32 = 4096;

/// The contents of fw_cfg file `name`, `None` when the VM has no such file
/// (or no fw_cfg device). Must run on a thread that may drop its I/O port
/// permission again (it does so before returning): call it before the
/// async runtime starts.
pub fn read_file(name: &str) -> std::io::Result<Option<Vec<u8>>> {
    let ports = Ports::open()?;
    let mut count = [0u8; 4];
    ports.select(FILE_DIR);
    ports.read(&mut count);
    let count = u32::from_be_bytes(count);
    if count == 0 || count > MAX_FILES {
        return Ok(None);
    }
    let mut entry = [0u8; ENTRY_LEN];
    for _ in 0..count {
        ports.read(&mut entry);
        let size = u32::from_be_bytes([entry[0], entry[1], entry[2], entry[3]]);
        let key = u16::from_be_bytes([entry[4], entry[5]]);
        let raw = &entry[8..8 + NAME_LEN];
        let end = raw.iter().position(|b| *b == 0).unwrap_or(NAME_LEN);
        if &raw[..end] != name.as_bytes() {
            continue;
        }
        if size > MAX_FILE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("fw_cfg file {name} is {size} bytes, more than {MAX_FILE}"),
            ));
        }
        let mut data = vec![0u8; size as usize];
        ports.select(key);
        ports.read(&mut data);
        return Ok(Some(data));
    }
    Ok(None)
}

/// Permission to use the two ports, dropped when this goes.
struct Ports;

impl Ports {
    fn open() -> std::io::Result<Self> {
        // SAFETY: ioperm only changes this thread's I/O permission bitmap.
        if unsafe { libc::ioperm(SELECTOR_PORT.into(), 2, 1) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self)
    }

    fn select(&self, key: u16) {
        // SAFETY: the port is fw_cfg's selector, which this thread may use
        // (see `open`); the write touches no memory.
        unsafe {
            std::arch::asm!("out dx, ax", in("dx") SELECTOR_PORT, in("ax") key,
                options(nomem, nostack, preserves_flags));
        }
    }

    fn read(&self, buf: &mut [u8]) {
        for byte in buf {
            let value: u8;
            // SAFETY: as in `select`; the read of fw_cfg's data port
            // touches no memory.
            unsafe {
                std::arch::asm!("in al, dx", out("al") value, in("dx") DATA_PORT,
                    options(nomem, nostack, preserves_flags));
            }
            *byte = value;
        }
    }
}

impl Drop for Ports {
    fn drop(&mut self) {
        // SAFETY: as in `open`.
        unsafe {
            libc::ioperm(SELECTOR_PORT.into(), 2, 0);
        }
    }
}
