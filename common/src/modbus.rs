//! A class's Modbus register map: which holding or input registers hold each sensor's values, how they are
//! encoded, and how they scale to engineering units (`value = raw * scale + offset`). The agent's Modbus
//! source reads with it; the simulated Modbus device writes with it. Pure.

use serde::{Deserialize, Serialize};

/// `[modbus]` in a class file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusMap {
    /// One entry per channel: a sensor's entries, in file order, are its channels in order.
    pub registers: Vec<Register>,
}

/// Which table a register is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Table {
    /// Function code 3; read-write on the device.
    Holding,
    /// Function code 4; read-only.
    Input,
}

/// How a value is laid out in registers. 32-bit types take two registers, high word first (the common
/// "big-endian word order").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegisterType {
    U16,
    I16,
    U32,
    I32,
    F32,
}

impl RegisterType {
    /// Registers a value takes.
    pub fn words(self) -> u16 {
        match self {
            RegisterType::U16 | RegisterType::I16 => 1,
            RegisterType::U32 | RegisterType::I32 | RegisterType::F32 => 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Register {
    pub sensor: String,
    pub table: Table,
    /// Zero-based register address (the PDU address; "40001" in the old notation is address 0).
    pub address: u16,
    #[serde(rename = "type", default = "default_type")]
    pub kind: RegisterType,
    #[serde(default = "one")]
    pub scale: f64,
    #[serde(default)]
    pub offset: f64,
}

fn default_type() -> RegisterType {
    RegisterType::U16
}
fn one() -> f64 {
    1.0
}

impl Register {
    /// The engineering value of the register words read (`words.len()` must be [`RegisterType::words`]).
    pub fn decode(&self, words: &[u16]) -> Option<f64> {
        let raw = match (self.kind, words) {
            (RegisterType::U16, [w]) => f64::from(*w),
            (RegisterType::I16, [w]) => f64::from(*w as i16),
            (RegisterType::U32, [hi, lo]) => f64::from((u32::from(*hi) << 16) | u32::from(*lo)),
            (RegisterType::I32, [hi, lo]) => f64::from(((u32::from(*hi) << 16) | u32::from(*lo)) as i32),
            (RegisterType::F32, [hi, lo]) => f64::from(f32::from_bits((u32::from(*hi) << 16) | u32::from(*lo))),
            _ => return None,
        };
        Some(raw * self.scale + self.offset)
    }

    /// The register words for an engineering value, rounded and saturated to the type's range (what a device
    /// holding this value would expose).
    pub fn encode(&self, value: f64) -> Vec<u16> {
        let raw = (value - self.offset) / self.scale;
        let split = |u: u32| vec![(u >> 16) as u16, u as u16];
        match self.kind {
            RegisterType::U16 => vec![raw.round().clamp(0.0, f64::from(u16::MAX)) as u16],
            RegisterType::I16 => vec![raw.round().clamp(f64::from(i16::MIN), f64::from(i16::MAX)) as i16 as u16],
            RegisterType::U32 => split(raw.round().clamp(0.0, f64::from(u32::MAX)) as u32),
            RegisterType::I32 => split(raw.round().clamp(f64::from(i32::MIN), f64::from(i32::MAX)) as i32 as u32),
            RegisterType::F32 => split((raw as f32).to_bits()),
        }
    }
}

impl ModbusMap {
    /// The entries of `sensor`, in channel order.
    pub fn of<'a>(&'a self, sensor: &'a str) -> impl Iterator<Item = &'a Register> + 'a {
        self.registers.iter().filter(move |r| r.sensor == sensor)
    }

    /// Every rule the types cannot express; `channels(sensor)` is the class's channel count of a sensor, or
    /// `None` for an unknown sensor. Errors name the entry (`modbus.registers[i].key`).
    pub fn check(&self, channels: impl Fn(&str) -> Option<usize>) -> Result<(), (String, String)> {
        let key = |i: usize, k: &str| format!("modbus.registers[{i}].{k}");
        if self.registers.is_empty() {
            return Err(("modbus.registers".into(), "at least one register is required".into()));
        }
        for (i, r) in self.registers.iter().enumerate() {
            if channels(&r.sensor).is_none() {
                return Err((key(i, "sensor"), format!("no sensor `{}` in this class", r.sensor)));
            }
            if !(r.scale.is_finite() && r.scale != 0.0) {
                return Err((key(i, "scale"), "must be a finite number other than 0".into()));
            }
            if !r.offset.is_finite() {
                return Err((key(i, "offset"), "must be a finite number".into()));
            }
            if u32::from(r.address) + u32::from(r.kind.words()) > 65_536 {
                return Err((key(i, "address"), "the value runs past register 65535".into()));
            }
            let overlaps = self.registers[..i].iter().any(|o| {
                o.table == r.table
                    && r.address < o.address.saturating_add(o.kind.words())
                    && o.address < r.address.saturating_add(r.kind.words())
            });
            if overlaps {
                return Err((key(i, "address"), format!("overlaps another {:?} register", r.table).to_lowercase()));
            }
        }
        for (i, r) in self.registers.iter().enumerate() {
            let n = channels(&r.sensor).unwrap_or(0);
            let mapped = self.of(&r.sensor).count();
            if mapped != n {
                return Err((
                    key(i, "sensor"),
                    format!("sensor `{}` has {n} channels but {mapped} registers map to it", r.sensor),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(kind: RegisterType, scale: f64, offset: f64) -> Register {
        Register { sensor: "t".into(), table: Table::Holding, address: 0, kind, scale, offset }
    }

    #[test]
    fn every_type_round_trips_with_scale_and_offset() {
        for (kind, v) in [
            (RegisterType::U16, 72.31),
            (RegisterType::I16, -12.5),
            (RegisterType::U32, 123_456.78),
            (RegisterType::I32, -98_765.43),
            (RegisterType::F32, 3.25),
        ] {
            let r = reg(kind, 0.01, 0.0);
            let words = r.encode(v);
            assert_eq!(words.len(), usize::from(kind.words()));
            let back = r.decode(&words).unwrap();
            assert!((back - v).abs() < 0.006, "{kind:?}: {v} -> {words:?} -> {back}");
        }
        // Offset: a 4-20 mA style mapping, 0..=65535 onto -40..=200 °C.
        let r = reg(RegisterType::U16, 240.0 / 65_535.0, -40.0);
        assert!((r.decode(&r.encode(70.0)).unwrap() - 70.0).abs() < 0.01);
        assert_eq!(r.decode(&[0]).unwrap(), -40.0);
    }

    #[test]
    fn words_decode_big_endian_and_saturate_on_encode() {
        let r = reg(RegisterType::I32, 1.0, 0.0);
        assert_eq!(r.decode(&[0xFFFF, 0xFFFE]), Some(-2.0));
        assert_eq!(r.decode(&[1]), None, "an i32 needs two registers");
        let r = reg(RegisterType::U16, 1.0, 0.0);
        assert_eq!(r.encode(-5.0), vec![0]);
        assert_eq!(r.encode(1e9), vec![u16::MAX]);
        let f = reg(RegisterType::F32, 1.0, 0.0);
        assert_eq!(f.encode(1.0), vec![0x3F80, 0x0000]);
    }

    #[test]
    fn bad_maps_are_named() {
        let channels = |s: &str| (s == "t").then_some(1);
        let map = |regs: Vec<Register>| ModbusMap { registers: regs };
        let ok = reg(RegisterType::U16, 0.1, 0.0);
        assert!(map(vec![ok.clone()]).check(channels).is_ok());
        let cases = [
            (vec![], "modbus.registers"),
            (vec![Register { sensor: "x".into(), ..ok.clone() }], "modbus.registers[0].sensor"),
            (vec![Register { scale: 0.0, ..ok.clone() }], "modbus.registers[0].scale"),
            (vec![Register { address: 65_535, kind: RegisterType::F32, ..ok.clone() }], "modbus.registers[0].address"),
            (vec![ok.clone(), Register { address: 0, ..ok.clone() }], "modbus.registers[1].address"),
        ];
        for (regs, key) in cases {
            assert_eq!(map(regs).check(channels).unwrap_err().0, key);
        }
        // Two registers for a one-channel sensor.
        let two = map(vec![ok.clone(), Register { address: 1, ..ok.clone() }]);
        let (key, reason) = two.check(channels).unwrap_err();
        assert_eq!(key, "modbus.registers[0].sensor");
        assert!(reason.contains("1 channels but 2 registers"), "{reason}");
    }
}
