//! The defaults and bounds of every setting have one source, the library (`Options::default`,
//! `merge::BOUNDS`, checked by `Options::validate`): the page's settings form must show the same
//! (this test reads www/index.html), and validation must refuse exactly what the bounds exclude.
//! The CLI's defaults are checked beside its argument parser (`src/bin/iteris.rs`).

use iteris::merge::{Options, BOUNDS};
use regex::Regex;

/// `name="value"` attributes of one tag.
fn attributes(tag: &str) -> Vec<(String, String)> {
    let re = Regex::new(r#"([a-z-]+)="([^"]*)""#).unwrap();
    re.captures_iter(tag).map(|c| (c[1].to_string(), c[2].to_string())).collect()
}

#[test]
fn the_pages_settings_show_the_librarys_defaults_and_bounds() {
    let html = std::fs::read_to_string("www/index.html").unwrap();
    let defaults = serde_json::to_value(Options::default()).unwrap();
    let mut checked = 0;
    let inputs = Regex::new(r#"<input id="[^"]+"[^>]*>"#).unwrap();
    for tag in inputs.find_iter(&html) {
        let attrs = attributes(tag.as_str());
        let get = |k: &str| attrs.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let id = get("id").unwrap();
        let field = id.replace('-', "_");
        let Some(default) = defaults.get(&field) else { continue };
        if get("type") == Some("checkbox") {
            let shown = tag.as_str().contains(" checked");
            assert_eq!(Some(shown), default.as_bool(), "#{id} is checked: {shown}, the library's default is {default}");
            checked += 1;
            continue;
        }
        match get("value") {
            Some(v) => assert_eq!(
                v.parse::<f64>().ok(),
                default.as_f64(),
                "#{id} shows {v}, the library's default is {default}"
            ),
            None => assert!(default.is_null(), "#{id} shows no value, the library's default is {default}"),
        }
        let bounds = BOUNDS.iter().find(|b| b.field == field);
        for (attr, want) in [("min", bounds.map(|b| b.min)), ("max", bounds.map(|b| b.max))] {
            if let Some(v) = get(attr) {
                assert_eq!(v.parse::<f64>().ok(), want, "#{id}'s {attr} is {v}, the library's bounds are {bounds:?}");
            } else if get("type") == Some("number") && attr == "min" {
                panic!("#{id} is a number without a min: the library's bounds are {bounds:?}");
            }
        }
        checked += 1;
    }
    let selects = Regex::new(r#"(?s)<select id="([^"]+)">(.*?)</select>"#).unwrap();
    let selected = Regex::new(r#"<option value="([^"]+)" selected>"#).unwrap();
    for c in selects.captures_iter(&html) {
        let (id, options) = (&c[1], &c[2]);
        let want = match id {
            "backend" => serde_json::to_value(iteris::engine::BackendChoice::default()).unwrap(),
            _ => match defaults.get(id) {
                Some(d) => d.clone(),
                None => continue,
            },
        };
        let shown = selected.captures(options).map(|s| s[1].to_string());
        assert_eq!(shown.as_deref(), want.as_str(), "#{id} selects {shown:?}, the library's default is {want}");
        checked += 1;
    }
    assert!(checked >= 15, "only {checked} of the page's settings were found in www/index.html");
}

#[test]
fn validation_refuses_exactly_what_the_bounds_exclude() {
    let jacobi = Options { schedule: iteris::merge::Schedule::Jacobi, ..Options::default() };
    jacobi.validate(2).unwrap();
    for b in &BOUNDS {
        let with = |v: f64| {
            let mut o = serde_json::to_value(&jacobi).unwrap();
            o[b.field] = if b.integer { serde_json::json!(v as u64) } else { serde_json::json!(v) };
            serde_json::from_value::<Options>(o).unwrap()
        };
        // rho is an f32: a step it can hold.
        let step = if b.integer { 1.0 } else { 1e-6 };
        with(b.max).validate(2).unwrap_or_else(|e| panic!("{} at its max {}: {e}", b.field, b.max));
        if b.open_min {
            assert!(with(b.min).validate(2).is_err(), "{} at its excluded min {}", b.field, b.min);
            with(b.min + step).validate(2).unwrap();
        } else {
            with(b.min).validate(2).unwrap_or_else(|e| panic!("{} at its min {}: {e}", b.field, b.min));
            if b.min >= step {
                let e = with(b.min - step).validate(2).unwrap_err().to_string();
                assert!(e.starts_with(b.flag), "{} below its min: {e}", b.field);
            }
        }
        if b.max < 1e15 {
            let e = with(b.max + step)
                .validate(2)
                .err()
                .unwrap_or_else(|| panic!("{} above its max passed", b.field))
                .to_string();
            assert!(e.starts_with(b.flag), "{} above its max: {e}", b.field);
        }
    }
}
