//! Modbus TCP: polls a device's holding or input registers, as the class's `[modbus]` map says, and turns
//! each sensor's registers into a sample in engineering units (`raw * scale + offset`).
//!
//! The device answering with a Modbus exception (an unknown register, say) is bad input: it is counted and
//! logged with the register, and that sensor's sample is skipped this round. A connection that fails or a
//! device that does not answer in time is an outage: the source logs it, backs off (1 s doubling to 30 s) and
//! connects again; no sample is made up meanwhile.

use super::{SampleSink, Source, SourceFuture};
use crate::source::Sample;
use edgeloop_common::modbus::{ModbusMap, Register, Table};
use std::net::SocketAddr;
use std::time::Duration;
use tokio_modbus::client::{Context, Reader};
use tokio_util::sync::CancellationToken;

/// The first wait before connecting again to a device that refused or did not answer.
const RECONNECT_MIN: Duration = Duration::from_secs(1);
/// The longest wait between two connection attempts.
const RECONNECT_MAX: Duration = Duration::from_secs(30);

pub struct ModbusSource {
    address: SocketAddr,
    unit: u8,
    poll: Duration,
    timeout: Duration,
    map: ModbusMap,
    /// Mapped sensors, in the class's order.
    sensors: Vec<String>,
}

/// What reading one register gave.
#[derive(Debug, Clone, PartialEq)]
pub enum Read {
    Words(Vec<u16>),
    /// The device answered with an exception.
    Exception(String),
}

impl ModbusSource {
    /// `class_sensors` orders the samples; `poll` defaults to the fastest mapped sensor's nominal period.
    pub fn new(
        address: SocketAddr,
        unit: u8,
        poll: Duration,
        timeout: Duration,
        map: ModbusMap,
        class_sensors: &[String],
    ) -> Self {
        let sensors = class_sensors.iter().filter(|s| map.of(s).next().is_some()).cloned().collect();
        ModbusSource { address, unit, poll, timeout, map, sensors }
    }
}

fn describe(r: &Register) -> String {
    let table = match r.table {
        Table::Holding => "holding",
        Table::Input => "input",
    };
    format!("{table} register {} ({})", r.address, r.sensor)
}

/// Turns one round of reads (one per map entry, in map order) into samples, one per sensor whose every
/// channel was read; calls `reject(reason)` for each register the device refused or that does not decode.
pub fn assemble(
    map: &ModbusMap,
    sensors: &[String],
    reads: &[Read],
    ts_ms: u64,
    reject: &mut dyn FnMut(String),
) -> Vec<Sample> {
    let mut out = Vec::new();
    for sensor in sensors {
        let mut values = Vec::new();
        let mut complete = true;
        for (reg, read) in map.registers.iter().zip(reads).filter(|(r, _)| &r.sensor == sensor) {
            match read {
                Read::Words(w) => match reg.decode(w) {
                    Some(v) if v.is_finite() => values.push(v),
                    _ => {
                        reject(format!("{}: {} words do not decode as {:?}", describe(reg), w.len(), reg.kind));
                        complete = false;
                    }
                },
                Read::Exception(e) => {
                    reject(format!("{}: the device answered {e}", describe(reg)));
                    complete = false;
                }
            }
        }
        if complete && !values.is_empty() {
            out.push(Sample { sensor: sensor.clone(), ts_ms: Some(ts_ms), values });
        }
    }
    out
}

/// Reads every register of the map once; `Err` on a transport failure or timeout.
async fn read_all(ctx: &mut Context, map: &ModbusMap, timeout: Duration) -> anyhow::Result<Vec<Read>> {
    let mut reads = Vec::with_capacity(map.registers.len());
    for r in &map.registers {
        let words = r.kind.words();
        let call = async {
            match r.table {
                Table::Holding => ctx.read_holding_registers(r.address, words).await,
                Table::Input => ctx.read_input_registers(r.address, words).await,
            }
        };
        let answer = tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| anyhow::anyhow!("{}: no answer within {timeout:?}", describe(r)))?
            .map_err(|e| anyhow::anyhow!("{}: {e}", describe(r)))?;
        reads.push(match answer {
            Ok(w) => Read::Words(w),
            Err(code) => Read::Exception(format!("{code:?}")),
        });
    }
    Ok(reads)
}

impl Source for ModbusSource {
    fn name(&self) -> String {
        format!("modbus {} unit {}", self.address, self.unit)
    }

    fn run(self: Box<Self>, sink: SampleSink, cancel: CancellationToken) -> SourceFuture {
        Box::pin(async move {
            let origin = self.name();
            let mut backoff = crate::backoff::Backoff::new(RECONNECT_MIN, RECONNECT_MAX);
            loop {
                let connect = tokio_modbus::client::tcp::connect_slave(self.address, tokio_modbus::Slave(self.unit));
                let connected = tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    r = tokio::time::timeout(self.timeout, connect) => r,
                };
                let mut ctx = match connected {
                    Ok(Ok(ctx)) => {
                        tracing::info!(source = %origin, "Modbus device connected");
                        backoff.reset();
                        ctx
                    }
                    Ok(Err(e)) => {
                        let retry_in = backoff.next_delay().unwrap_or(RECONNECT_MAX);
                        tracing::warn!(source = %origin, error = %e, ?retry_in, "cannot connect to the Modbus device");
                        tokio::select! { _ = cancel.cancelled() => return Ok(()), _ = tokio::time::sleep(retry_in) => {} }
                        continue;
                    }
                    Err(_) => {
                        let retry_in = backoff.next_delay().unwrap_or(RECONNECT_MAX);
                        tracing::warn!(source = %origin, timeout = ?self.timeout, ?retry_in, "the Modbus device did not accept the connection in time");
                        tokio::select! { _ = cancel.cancelled() => return Ok(()), _ = tokio::time::sleep(retry_in) => {} }
                        continue;
                    }
                };
                let mut tick = tokio::time::interval(self.poll);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! { _ = cancel.cancelled() => return Ok(()), _ = tick.tick() => {} }
                    let reads = match read_all(&mut ctx, &self.map, self.timeout).await {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::warn!(source = %origin, error = %e, "Modbus read failed; connecting again");
                            break;
                        }
                    };
                    let now = edgeloop_common::unix_millis();
                    let samples =
                        assemble(&self.map, &self.sensors, &reads, now, &mut |why| sink.reject(&origin, &why));
                    for s in samples {
                        if sink.send(s).await.is_err() {
                            return Ok(());
                        }
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeloop_common::modbus::RegisterType;

    fn map() -> ModbusMap {
        let r = |sensor: &str, address: u16, kind: RegisterType, scale: f64| Register {
            sensor: sensor.into(),
            table: Table::Holding,
            address,
            kind,
            scale,
            offset: 0.0,
        };
        ModbusMap {
            registers: vec![
                r("temp", 0, RegisterType::I16, 0.01),
                r("accel", 1, RegisterType::F32, 1.0),
                r("accel", 3, RegisterType::F32, 1.0),
            ],
        }
    }

    #[test]
    fn each_sensor_becomes_one_sample_in_engineering_units() {
        let sensors = vec!["temp".to_string(), "accel".to_string()];
        let reads =
            vec![Read::Words(vec![(-1234i16) as u16]), Read::Words(vec![0x3F80, 0]), Read::Words(vec![0x4000, 0])];
        let mut rejected = Vec::new();
        let s = assemble(&map(), &sensors, &reads, 42, &mut |r| rejected.push(r));
        assert!(rejected.is_empty());
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].sensor.as_str(), s[0].ts_ms), ("temp", Some(42)));
        assert!((s[0].values[0] + 12.34).abs() < 1e-9);
        assert_eq!(s[1].values, vec![1.0, 2.0]);
    }

    #[test]
    fn a_refused_or_undecodable_register_drops_only_its_sensor_and_is_named() {
        let sensors = vec!["temp".to_string(), "accel".to_string()];
        let reads = vec![
            Read::Words(vec![100]),
            Read::Exception("IllegalDataAddress".into()),
            Read::Words(vec![0x7FC0, 0]), // NaN
        ];
        let mut rejected = Vec::new();
        let s = assemble(&map(), &sensors, &reads, 1, &mut |r| rejected.push(r));
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].values, vec![1.0]);
        assert_eq!(rejected.len(), 2, "{rejected:?}");
        assert!(rejected[0].contains("holding register 1 (accel)") && rejected[0].contains("IllegalDataAddress"));
        assert!(rejected[1].contains("holding register 3 (accel)"));
    }
}
