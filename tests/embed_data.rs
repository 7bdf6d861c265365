//! Point sets of `kiln embed`: the bundled digits, translating squares, and CSV errors that
//! name the file, the line and the column.

use kiln::embed::{load_csv, parse_csv, translating_squares};
use std::path::Path;

fn error(text: &str) -> String {
    format!("{:#}", parse_csv(text, "points.csv").unwrap_err())
}

#[test]
fn digits_load_as_1797_points_in_64_dimensions() {
    let digits = load_csv(Path::new("tests/data/digits.csv")).unwrap();
    assert_eq!((digits.n, digits.d), (1797, 64));
    assert!(digits.x.iter().all(|&v| (0.0..=16.0).contains(&v)));
    let first = digits.first(500);
    assert_eq!((first.n, first.x.len()), (500, 500 * 64));
}

#[test]
fn translating_squares_are_81_points_in_256_dimensions() {
    let s = translating_squares();
    assert_eq!((s.n, s.d), (81, 256));
    // all distinct
    for i in 0..s.n {
        for j in i + 1..s.n {
            assert_ne!(&s.x[i * 256..(i + 1) * 256], &s.x[j * 256..(j + 1) * 256]);
        }
    }
}

#[test]
fn ragged_rows_name_the_line() {
    let e = error("1,2,3\n4,5,6\n7,8\n");
    assert!(
        e.contains("points.csv line 3") && e.contains("2 fields") && e.contains("ragged"),
        "{e}"
    );
    let e = error("a,b\n1,2\n3,4,5\n");
    assert!(e.contains("line 3") && e.contains("line 1 has 2"), "{e}");
}

#[test]
fn non_numbers_name_line_and_column() {
    let e = error("1,2,3\n4,x5,6\n");
    assert!(
        e.contains("points.csv line 2, column 2") && e.contains("`x5`"),
        "{e}"
    );
    let e = error("1,2\n3,NaN\n");
    assert!(
        e.contains("line 2, column 2") && e.contains("not a finite number"),
        "{e}"
    );
    let e = error("1,2\n3,\n");
    assert!(e.contains("line 2, column 2"), "{e}");
}

#[test]
fn fewer_than_two_points_is_an_error() {
    for text in ["", "a,b\n", "1,2\n", "a,b\n1,2\n\n"] {
        let e = error(text);
        assert!(
            e.contains("points.csv") && e.contains("at least 2 points"),
            "{text:?}: {e}"
        );
    }
}

#[test]
fn a_missing_file_names_it() {
    let e = format!(
        "{:#}",
        load_csv(Path::new("no/such/points.csv")).unwrap_err()
    );
    assert!(e.contains("no/such/points.csv"), "{e}");
}
